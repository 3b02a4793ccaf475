"""Before the worker commit: a lone request's record always goes to the writer thread (the
worker that ran the request never commits it itself)."""

from cellinspect.serving import records

records.RecordStore.try_commit = lambda self, record: (False, None)
