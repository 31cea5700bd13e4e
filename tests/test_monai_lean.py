"""The lean MONAI import (ingest/monai_lean.py) preprocesses exactly as the ordinary import does.

Each import lives in a fresh interpreter: this test process may have imported MONAI already.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import hashlib, json, sys
    import numpy as np
    if sys.argv[1] == "fallback":
        # The lean path fails half-way (after registering a bare 'monai'): the plain import must take over.
        from voxsearch.ingest import monai_lean
        real = monai_lean._bare_package
        def broken(name):
            if name == "monai.apps":
                raise ImportError("planted")
            return real(name)
        monai_lean._bare_package = broken
    from voxsearch.ingest import PreprocessConfig, preprocess_volume, render_study
    from voxsearch.ingest.volume import HU, RAW, Volume
    digests = []
    for seed, force_ct in ((5, True), (6, False), (7, False)):
        st = render_study(np.random.default_rng(seed), "tiny", ct_share=0.0, force_ct=force_ct)
        volume = Volume(array=st.array, affine=st.affine, spacing=tuple(np.abs(np.diag(st.affine)[:3])),
                        modality=st.modality, units=HU if st.modality == "CT" else RAW)
        for cfg in (PreprocessConfig(spatial_size=(16, 32, 32)),
                    PreprocessConfig(spatial_size=(12, 24, 24), target_spacing=(3.0, 3.0, 4.0))):
            out = preprocess_volume(volume, cfg)
            digests.append([st.modality, hashlib.sha256(out.tobytes()).hexdigest()])
    print(json.dumps({"digests": digests, "whole_package": "monai.apps.mmars" in sys.modules,
                      "bert": "transformers" in sys.modules}))
""")


def _run(mode: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_lean_import_preprocesses_like_the_whole_package():
    lean = _run("lean")
    whole = _run("fallback")
    # The lean path skipped the package __init__ (no BERT through monai.apps.mmars); the broken one
    # fell back to it.
    assert not lean["whole_package"] and not lean["bert"]
    assert whole["whole_package"]
    assert {m for m, _ in lean["digests"]} == {"CT", "MR"}
    assert lean["digests"] == whole["digests"]
