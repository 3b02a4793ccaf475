"""Before session 6: `serve --workers N` runs uvicorn's own supervisor, whose workers all
accept from one socket bound in the parent."""

from uvicorn.supervisors.multiprocess import Multiprocess

import cellinspect.serving.supervisor as supervisor


def run_workers(config):
    Multiprocess(config, sockets=[config.bind_socket()]).run()


supervisor.run_workers = run_workers
