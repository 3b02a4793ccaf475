"""Before session 6: an image archived already is found only on a thread (the archive's
`save`), so every repeated scrap image costs a hand-off to a thread and back."""

import cellinspect.serving.archive as archive

archive.ImageArchive.stored = lambda self, sha256: None
