"""An evaluation actor with injected faults, for the Ray backend tests."""

from __future__ import annotations

import os
from pathlib import Path

from mergekit_ext.evo.ray_worker import EvaluationWorker

# Folder of the fault files; Ray constructs the actors itself, so settings reach them through files.
FAULT_FOLDER_VARIABLE = "MERGEKIT_EXT_TEST_FAULTS"
# While this file exists, the next evaluation in the cluster kills its actor process and writes `crashed`.
CRASH_ARMED = "crash_armed"
CRASHED = "crashed"
# Every evaluation of the genome key in this file raises ValueError.
FAIL_KEY = "fail_key"


def genome_key(genes) -> str:
    """The key `Genome.key()` gives these genes."""
    return ",".join(f"{gene:.9f}" for gene in genes)


class FaultInjectingWorker(EvaluationWorker):
    """Evaluation actor that crashes or raises as the fault files ask."""

    def evaluate(self, genes, problems):
        folder = Path(os.environ[FAULT_FOLDER_VARIABLE])
        try:
            # Removing the file is atomic, so exactly one actor crashes.
            os.unlink(folder / CRASH_ARMED)
        except FileNotFoundError:
            pass
        else:
            (folder / CRASHED).write_text(genome_key(genes[0]))
            os._exit(1)
        fail_path = folder / FAIL_KEY
        if fail_path.is_file():
            target = fail_path.read_text()
            if any(genome_key(row) == target for row in genes):
                raise ValueError(f"injected failure for {target}")
        return super().evaluate(genes, problems)
