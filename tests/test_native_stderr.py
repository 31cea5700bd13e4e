"""The program's native-stderr filter: Ray's known-harmless C++ line goes, everything else still shows."""

from __future__ import annotations

import subprocess
import sys
import textwrap

HARMLESS = ("[2026-11-28 16:42:38,991 E 12649 12649] core_worker.cc:2465: Actor with class name: "
            "'MapWorker(MapBatches(_RayWorker))' and ID: '75945787528eeace71eeae5401000000' has constructor "
            "arguments in the object store and max_restarts > 0. If the arguments in the object store go out "
            "of scope or are lost, the actor restart will fail. See https://github.com/ray-project/ray/issues/53727 "
            "for more details.")


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, timeout=60)


def test_native_writes_lose_only_the_harmless_line_and_python_output_stays():
    result = _run(f"""
        import logging, os, sys
        from voxsearch.common.native_stderr import filter_native_stderr
        filter_native_stderr()
        logging.basicConfig(format="%(levelname)s %(message)s")
        os.write(2, b"[E core_worker.cc:12] a real error of the core\\n")
        os.write(2, {HARMLESS!r}.encode() + b"\\n")
        os.write(2, b"a line without its newline")
        logging.getLogger("x").warning("from python logging")
        print("from print", file=sys.stderr)
    """)
    err = result.stderr.decode()
    assert result.returncode == 0, err
    assert "a real error of the core" in err
    assert "a line without its newline" in err  # shown at exit although its newline never came
    assert "WARNING from python logging" in err and "from print" in err
    assert "has constructor arguments in the object store" not in err


def test_without_the_filter_the_line_shows():
    # The same native write without the filter reaches stderr: what the test above removes is really there.
    result = _run(f"""
        import os
        os.write(2, {HARMLESS!r}.encode() + b"\\n")
    """)
    assert "has constructor arguments in the object store" in result.stderr.decode()


def test_a_traceback_still_reaches_the_terminal():
    result = _run("""
        from voxsearch.common.native_stderr import filter_native_stderr
        filter_native_stderr()
        raise SystemExit(__import__("sys").exit(1 / 0))
    """)
    assert result.returncode == 1 and "ZeroDivisionError" in result.stderr.decode()
