"""Beam jobs turning corpora into Arrow shards: pretrain_data (blocks with BoW targets) and finetune_data."""

from common.quiet_log import silence_known_notices

silence_known_notices()  # before any job imports apache_beam, which logs a notice on import (common/quiet_log.py)
