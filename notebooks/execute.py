"""Runs the notebooks in place, so that the committed copies show their outputs.

    python notebooks/execute.py [NOTEBOOK ...]

``make test`` executes them too (with nbmake), without writing them back.
"""

import pathlib
import sys
import time

import nbformat
from nbclient import NotebookClient

HERE = pathlib.Path(__file__).parent


def main(argv):
  paths = [pathlib.Path(p) for p in argv] or sorted(HERE.glob("*.ipynb"))
  for path in paths:
    nb = nbformat.read(path, as_version=4)
    t0 = time.perf_counter()
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    nbformat.write(nb, path)
    print(f"{path.name}: {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
  main(sys.argv[1:])
