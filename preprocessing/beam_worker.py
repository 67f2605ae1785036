"""The local runner's worker processes: Beam's own SDK worker (`sdk_worker_main`), started through this module so
that the start-up notices a user cannot act on (common/quiet_log.py) are filtered there too: `python -m` imports
the `preprocessing` package first, whose __init__ installs the filters before Beam is imported.

The DirectRunner's multi-processing mode starts `python -m apache_beam.runners.worker.sdk_worker_main` for each
worker; `QuietWorkersRunner` is that runner with the command pointed here. Nothing else changes: the same
function runs with the same environment and arguments.
"""
from __future__ import annotations

import sys

from apache_beam.portability import python_urns
from apache_beam.runners.portability.fn_api_runner import fn_runner

BEAM_WORKER = "apache_beam.runners.worker.sdk_worker_main"
WORKER = "preprocessing.beam_worker"


class QuietWorkersRunner(fn_runner.FnApiRunner):
    """FnApiRunner whose subprocess workers run `python -m preprocessing.beam_worker` instead of Beam's module."""

    def run_via_runner_api(self, pipeline_proto, options):
        for environment in pipeline_proto.components.environments.values():
            if environment.urn == python_urns.SUBPROCESS_SDK:
                environment.payload = environment.payload.replace(BEAM_WORKER.encode(), WORKER.encode())
        return super().run_via_runner_api(pipeline_proto, options)


if __name__ == "__main__":
    from apache_beam.runners.worker import sdk_worker_main

    sdk_worker_main.main(sys.argv)
