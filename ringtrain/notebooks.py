"""Run the analysis notebooks headless, with parameters, as papermill does:

    python -m ringtrain.notebooks analysis/01_step_breakdown.ipynb \\
        -p RUN_DIRS '["runs/ring-n2", "runs/mpi-n2"]' -p FIG_DIR out/figures -o out/01.ipynb

Each notebook in analysis/ has a first code cell tagged `parameters` holding its defaults
(`RUN_DIRS`, `BENCH_JSON`, `FIG_DIR`, ...). The runner inserts a cell tagged
`injected-parameters` right after it that assigns the given values, then executes every
cell in a fresh kernel, in the notebook's own folder. A cell that raises stops the run with
the cell's error; the notebook executed so far is still written to the output path.

Parameters whose names end in _DIR, _DIRS, _JSON or _PATH are paths: relative ones (and
relative glob patterns) are taken from the caller's working directory, so a path means on
the command line what it means in the shell, while the kernel itself runs in the notebook's
folder as under Jupyter.

The kernel is the interpreter running this module (so it sees the same ringtrain, torch and
pandas), whatever kernels Jupyter has registered; pass `kernel_name` to use a registered one.
Needs nbclient, nbformat and ipykernel (`pip install -e ".[test]"`).
"""
from __future__ import annotations

import argparse
import ast
import copy
import json
import os
import sys
import tempfile

PARAMETERS_TAG = "parameters"
INJECTED_TAG = "injected-parameters"


class NotebookError(RuntimeError):
    """A notebook failed: the message names the notebook, the cell and the error."""


def parameter_cell_index(nb) -> int | None:
    """Index of the first cell tagged `parameters`, or None."""
    for i, cell in enumerate(nb.cells):
        if PARAMETERS_TAG in cell.get("metadata", {}).get("tags", []):
            return i
    return None


def inject_parameters(nb, params: dict):
    """A copy of `nb` with a cell assigning `params` (as Python literals) after the cell
    tagged `parameters` (at the top if none), replacing any cell injected before."""
    import nbformat

    nb = copy.deepcopy(nb)
    nb.cells = [c for c in nb.cells if INJECTED_TAG not in c.get("metadata", {}).get("tags", [])]
    if not params:
        return nb
    lines = ["# Parameters injected by ringtrain.notebooks"]
    for name, value in params.items():
        if not str(name).isidentifier():
            raise ValueError(f"parameter name {name!r} is not a Python identifier")
        lines.append(f"{name} = {value!r}")
    cell = nbformat.v4.new_code_cell("\n".join(lines), metadata={"tags": [INJECTED_TAG]})
    i = parameter_cell_index(nb)
    nb.cells.insert(0 if i is None else i + 1, cell)
    return nb


PATH_SUFFIXES = ("_DIR", "_DIRS", "_JSON", "_PATH")


def absolute_path_parameters(params: dict, base: str) -> dict:
    """`params` with the relative paths of path-named parameters (see PATH_SUFFIXES) made
    absolute against `base`; strings inside lists too. Other values are left alone."""

    def fix(v):
        if isinstance(v, str) and v and not os.path.isabs(os.path.expanduser(v)):
            return os.path.join(base, v)
        if isinstance(v, (list, tuple)):
            return [fix(x) for x in v]
        return v

    return {k: fix(v) if str(k).upper().endswith(PATH_SUFFIXES) else v for k, v in params.items()}


def _current_interpreter_kernel(tmpdir: str):
    """A KernelManager that starts ipykernel with sys.executable, through a kernelspec
    written to `tmpdir` (the registered `python3` spec may name another interpreter)."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    name = "ringtrain-python"
    spec_dir = os.path.join(tmpdir, "kernels", name)
    os.makedirs(spec_dir, exist_ok=True)
    with open(os.path.join(spec_dir, "kernel.json"), "w") as f:
        json.dump({
            "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": f"Python ({sys.executable})",
            "language": "python",
        }, f)
    ksm = KernelSpecManager(kernel_dirs=[os.path.join(tmpdir, "kernels")])
    ksm.ensure_native_kernel = False
    # IPC sockets in the private temp folder: nothing listens on TCP ports of the machine.
    return KernelManager(kernel_name=name, kernel_spec_manager=ksm, transport="ipc", ip=os.path.join(tmpdir, "kernel-ipc"))


def _kernel_env() -> dict:
    """The runner's environment, with this ringtrain importable in the kernel."""
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def execute_notebook(path: str, params: dict | None = None, out_path: str | None = None, timeout: float = 600, kernel_name: str | None = None, cwd: str | None = None):
    """Execute the notebook at `path` with `params` injected; return the executed notebook.

    timeout: seconds allowed per cell. out_path: where to write the executed notebook (also
    when a cell fails). cwd: the kernel's working directory (default: the notebook's folder,
    as in Jupyter, so the notebook's own defaults mean the same in both). Relative paths in
    path-named parameters are resolved against the caller's working directory first.
    Raises NotebookError naming the failing cell and its error."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError

    params = absolute_path_parameters(params or {}, os.getcwd())
    nb = inject_parameters(nbformat.read(path, as_version=4), params)
    cwd = cwd or os.path.dirname(os.path.abspath(path))
    with tempfile.TemporaryDirectory(prefix="ringtrain-kernel-") as tmp:
        if kernel_name:
            client = NotebookClient(nb, timeout=timeout, kernel_name=kernel_name, resources={"metadata": {"path": cwd}})
        else:
            client = NotebookClient(nb, km=_current_interpreter_kernel(tmp), timeout=timeout, resources={"metadata": {"path": cwd}})
        try:
            client.execute(env=_kernel_env(), cwd=cwd)
        except (CellExecutionError, CellTimeoutError) as e:
            raise NotebookError(f"{path}: {_describe_failure(nb, e)}") from None
        finally:
            if out_path:
                os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
                nbformat.write(nb, out_path)
    return nb


def _describe_failure(nb, exc) -> str:
    for i, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                src = cell.source.strip().splitlines()
                first = src[0] if src else ""
                return f"cell {i} ({first[:60]!r}) raised {out.get('ename')}: {out.get('evalue')}"
    return str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__


def _parse_value(text: str):
    """A parameter's value: a JSON or Python literal if it parses as one, else the string."""
    for parse in (json.loads, ast.literal_eval):
        try:
            return parse(text)
        except (ValueError, SyntaxError):
            pass
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m ringtrain.notebooks",
        description="Execute analysis notebooks headless with parameters injected after their `parameters` cell.",
    )
    p.add_argument("notebooks", nargs="+", metavar="NOTEBOOK")
    p.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                   help="set a parameter; VALUE is read as JSON or a Python literal, else taken as a string")
    p.add_argument("-o", "--output", default=None, help="executed notebook path (one notebook) or folder (several)")
    p.add_argument("--timeout", type=float, default=600, help="seconds allowed per cell")
    p.add_argument("--kernel", default=None, help="a registered Jupyter kernel name (default: this interpreter)")
    args = p.parse_args(argv)
    params = {name: _parse_value(value) for name, value in args.parameter}
    failed = 0
    for nb_path in args.notebooks:
        out = args.output
        if out and (len(args.notebooks) > 1 or os.path.isdir(out)):
            out = os.path.join(out, os.path.basename(nb_path))
        try:
            execute_notebook(nb_path, params, out_path=out, timeout=args.timeout, kernel_name=args.kernel)
            print(f"ok     {nb_path}" + (f" -> {out}" if out else ""))
        except NotebookError as e:
            failed += 1
            print(f"FAILED {e}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
