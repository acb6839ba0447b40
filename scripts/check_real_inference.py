#!/usr/bin/env python
# Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
"""Check that the bundle's inference output overlays real scans voxel for voxel.

For each input scan (NRRD, NIfTI, MHA, or a DICOM series folder) this runs the bundle's
``inference.json`` pipeline (SITKReader -> RAS -> resample -> sliding window -> Invertd -> SaveImaged)
with a *geometry probe* in place of the trained network: a 1x1x1 convolution whose argmax is
"intensity above the scan's median-to-99th-percentile midpoint". Because the probe is pointwise,
the correct output is known on the input grid, so any flip, transpose, shift or resampling error
shows up as a low Dice between the output and the thresholded input. With ``--dicom`` the scan is
also written as a DICOM series (SimpleITK) and run again; both outputs must agree in physical space.
With ``--ckpt`` the trained model is run instead and only the geometry (shape, affine) is checked.

Usage::

    python scripts/check_real_inference.py /work/shared/data/real/lung1_image.nrrd \\
        /work/shared/data/real/brain1_image.nrrd /work/shared/data/real/colin27/ch2.nii.gz --dicom

Prints one line per scan and exits with status 1 if any check fails.
"""

from __future__ import annotations

import argparse
import locale
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundles" / "ulite" / "configs"


def _probe_checkpoint(path: Path) -> Path:
    import torch

    k = 40.0  # argmax = scaled intensity > 0.5
    torch.save({"weight": torch.tensor([0.0, k]).reshape(2, 1, 1, 1, 1), "bias": torch.tensor([0.0, -0.5 * k])}, path)
    return path


def _run_inference(inputs: list[str], out_dir: Path, overrides: dict) -> None:
    from monai.bundle import ConfigWorkflow

    wf = ConfigWorkflow(
        config_file=str(CONFIGS / "inference.json"),
        meta_file=str(CONFIGS / "metadata.json"),
        logging_file=str(CONFIGS / "logging.conf"),
        workflow_type="infer",
        input=inputs,
        output_dir=str(out_dir),
        **overrides,
    )
    wf.initialize()
    wf.run()
    wf.finalize()


def _native_ras_spacing(affine: np.ndarray) -> list[float]:
    """The scan's own voxel spacing, in the order of the RAS axes the pipeline reorients to."""
    import nibabel as nib

    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    ornt = nib.orientations.io_orientation(affine)
    out = [0.0, 0.0, 0.0]
    for i, (axis, _) in enumerate(ornt):
        out[int(axis)] = float(spacing[i])
    return out


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    s = a.sum() + b.sum()
    return 1.0 if s == 0 else float(2 * np.logical_and(a, b).sum() / s)


def _write_dicom(path: str, folder: Path) -> Path:
    """Write a scan as a CT DICOM series with SimpleITK (one file per slice)."""
    import SimpleITK as sitk

    img = sitk.Cast(sitk.ReadImage(path), sitk.sitkInt16)
    folder.mkdir(parents=True, exist_ok=True)
    uid = "1.2.826.0.1.3680043.8.498." + str(abs(hash(path)) % 10**12)
    d = img.GetDirection()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    saved_ctype = locale.setlocale(locale.LC_CTYPE)
    for i in range(img.GetDepth()):
        sl = img[:, :, i]
        pos = img.TransformIndexToPhysicalPoint((0, 0, i))
        for k, v in {
            "0008|0016": "1.2.840.10008.5.1.4.1.1.2", "0008|0018": f"{uid}.{i + 1}", "0008|0060": "CT",
            "0020|000d": uid + ".1", "0020|000e": uid, "0020|0052": uid + ".2", "0020|0013": str(i + 1),
            "0020|0032": "\\".join(f"{p:.6f}" for p in pos),
            "0020|0037": "\\".join(f"{x:.8f}" for x in (d[0], d[3], d[6], d[1], d[4], d[7])),
            "0028|1052": "0", "0028|1053": "1",
        }.items():
            sl.SetMetaData(k, v)
        writer.SetFileName(str(folder / f"{i:04d}.dcm"))
        writer.Execute(sl)
    locale.setlocale(locale.LC_CTYPE, saved_ctype)  # GDCM's writer leaves LC_CTYPE at "C" (ASCII text I/O)
    return folder


def check(path: str, args, work: Path) -> bool:
    import nibabel as nib
    from monai.transforms import LoadImage

    from ulite_monai.io import SITKReader

    ref = LoadImage(reader=SITKReader(), image_only=True)(path)
    vals = ref.numpy()
    lo, hi = float(np.percentile(vals, 50)), float(np.percentile(vals, 99))
    overrides = {"pixdim": args.pixdim or _native_ras_spacing(ref.affine.numpy()), "roi_size": [64, 64, 64],
                 "sw_batch_size": 1}
    if args.ckpt:
        overrides["ckpt_path"] = args.ckpt
    else:
        overrides.update(
            ckpt_path=str(_probe_checkpoint(work / "probe.pt")),
            network_def={"_target_": "torch.nn.Conv3d", "in_channels": 1, "out_channels": 2, "kernel_size": 1},
            intensity_range=[lo, hi],
            keep_largest_component=False,  # the probe's answer is the full thresholded mask
        )
    name = Path(path).name
    out_dir = work / name.replace(".", "_")
    inputs = [path]
    dicom_dir = None
    if args.dicom:
        dicom_dir = _write_dicom(path, work / (name.replace(".", "_") + "_dicom"))
        inputs.append(str(dicom_dir))
    _run_inference(inputs, out_dir, overrides)
    outs = sorted(out_dir.glob("*.nii.gz"))
    ok = True
    msgs = []
    expected = vals > (lo + hi) / 2
    for out_path in outs:
        out = nib.load(str(out_path))
        seg = np.asarray(out.dataobj) > 0
        is_dicom = dicom_dir is not None and out_path.name.startswith(dicom_dir.name)
        src = LoadImage(reader=SITKReader(), image_only=True)(str(dicom_dir) if is_dicom else path)
        same_shape = seg.shape == tuple(src.shape)
        same_affine = np.allclose(out.affine, src.affine.numpy(), atol=1e-3)
        msg = f"{out_path.name}: shape {'ok' if same_shape else 'MISMATCH'}, affine {'ok' if same_affine else 'MISMATCH'}"
        ok &= same_shape and same_affine
        if not args.ckpt and same_shape:
            exp = src.numpy() > (lo + hi) / 2 if is_dicom else expected
            d = _dice(seg, exp)
            flip = _dice(seg, exp[::-1])
            msg += f", probe Dice {d:.3f} (mirrored {flip:.3f}), fg {int(seg.sum())} vox"
            ok &= d >= args.min_dice
        msgs.append(msg)
    if len(outs) != len(inputs):
        ok = False
        msgs.append(f"expected {len(inputs)} outputs, got {len(outs)}")
    print(f"[{'PASS' if ok else 'FAIL'}] {path}\n    " + "\n    ".join(msgs), flush=True)
    return ok


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("scans", nargs="+", help="image files or DICOM series folders")
    ap.add_argument("--dicom", action="store_true", help="also write each scan as a DICOM series and run on it")
    ap.add_argument("--ckpt", default=None, help="run this trained model.pt instead of the geometry probe")
    ap.add_argument("--pixdim", type=float, nargs=3, default=None,
                    help="resampling spacing in mm (default: the scan's own spacing, so the probe's answer is sharp; "
                    "pass e.g. 2.5 2.5 2.5 to exercise real resampling, then expect a lower Dice)")
    ap.add_argument("--min_dice", type=float, default=0.95, help="minimum probe Dice to pass")
    ap.add_argument("--workdir", default=None, help="keep outputs here (default: a temporary folder)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        results = [check(s, args, work) for s in args.scans]
    print(f"{sum(results)}/{len(results)} scans passed")
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
