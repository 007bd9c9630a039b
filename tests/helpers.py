"""Shared test helpers: tiny configs and running the entry points as a user would."""

import os
import subprocess
import sys

from configs.digits import get_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**overrides):
    config = get_config("tiny")
    for key, value in overrides.items():
        target = config
        *path, leaf = key.split(".")
        for part in path:
            target = target[part]
        target[leaf] = value
    return config


def run_entry_point(script, *args, timeout=300):
    """Run train.py / sample.py in a subprocess; returns CompletedProcess (text)."""
    env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run(
        [sys.executable, os.path.join(REPO, script), *args],
        capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env,
    )


class CountingSource:
    """Delegates to a data source and records every example index that is read."""

    def __init__(self, source):
        self.source, self.seen = source, []

    def __len__(self):
        return len(self.source)

    def __getitem__(self, index):
        self.seen.append(int(index))
        return self.source[index]

    def __getitems__(self, indices):
        return [self[i] for i in indices]

    def __getattr__(self, name):
        return getattr(self.source, name)
