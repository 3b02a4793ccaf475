"""Before ebe129b: start-up objects stay in the cyclic collector's full collections."""

import cellinspect.serving.app as app

app._frozen = True  # as if already frozen: the service never freezes
