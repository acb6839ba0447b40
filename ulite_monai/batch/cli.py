# Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
"""``ulite-dicom``: clinical batch inference with the ulite bundle.

Example::

    ulite-dicom /data/exports /data/results --bundle bundles/ulite --device cuda
    python -m ulite_monai.batch /data/exports /data/results --formats seg --overwrite
    ulite-dicom --from dicomweb://pacs.example.org/dicom-web --study-date 20240101-20240131 --modality CT \
        /data/results --push dicomweb://pacs.example.org/dicom-web --push dimse://ARCHIVE@10.0.0.5:104
    ulite-dicom /data/exports /data/results --ray --workers 4            # a private Ray instance on this machine
    ulite-dicom /data/exports /data/results --ray head-node:6379 --workers 8 --gpus-per-worker 0.5
    ulite-dicom /data/exports /data/results --num-shards 16 --shard-id 3  # one task of a job array
    ulite-dicom merge /data/results                                       # after the last shard

Exit status: 0 all fine; 1 finished, some series failed; 2 bad arguments, bundle or PACS query;
3 the output folder cannot be written; 4 finished, every series fine but some objects not pushed.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

__all__ = ["main", "build_parser"]

_REPO_ROOT = Path(__file__).resolve().parents[2]


def _default(rel: str) -> str:
    """A repository-relative default: ./rel if it exists, else next to the installed package."""
    here = Path(rel)
    return str(here if here.exists() else _REPO_ROOT / rel)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ulite-dicom",
        description=(
            "Segment every eligible DICOM series (and NIfTI/NRRD/MHA volume) under INPUT with the bundle's "
            "inference pipeline; write a DICOM SEG, a NIfTI label and a manifest row per series into OUTPUT. "
            "Reruns resume: series already done with the same model version are skipped."
        ),
    )
    p.add_argument("input", type=Path, nargs="?", default=None,
                   help="folder tree of DICOM files and/or NIfTI/NRRD/MHA volumes (or one file); not with --from")
    p.add_argument("output", type=Path, help="output folder (created); holds manifest.jsonl and the results")
    p.add_argument("--bundle", type=Path, default=None, help="bundle folder (default: bundles/ulite)")
    p.add_argument(
        "--config",
        type=Path,
        action="append",
        default=None,
        help="override config file merged onto the bundle's configs/inference.json (repeat to merge several, "
        "in order), e.g. --config configs/<override>.json",
    )
    p.add_argument(
        "--rules",
        type=str,
        default=None,
        help="series selection rules, MONAI Deploy DICOMSeriesSelectorOperator JSON "
        "(default: configs/series_selection.json; 'all' selects every image series)",
    )
    p.add_argument(
        "--first-match", action="store_true", help="per study and selection keep only the first matching series"
    )
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--checkpoint", type=Path, default=None, help="weights (default: <bundle>/models/model.pt)")
    p.add_argument(
        "--random-weights",
        action="store_true",
        help="ignore checkpoints, use a seeded random initialisation (smoke tests, throughput only)",
    )
    p.add_argument("--overwrite", action="store_true", help="redo series already done with this model version")
    p.add_argument("--formats", default="seg,nifti,qc",
                   help="comma-separated outputs: seg, nifti, rtstruct, sr (needs seg), qc (default: seg,nifti,qc)")
    p.add_argument("--seg-type", choices=("binary", "labelmap"), default="binary",
                   help="DICOM SEG encoding: binary (default, every viewer) or labelmap (one frame per plane, "
                   "newer readers)")
    p.add_argument("--position-tolerance", type=float, default=None, metavar="FRACTION",
                   help="plane position rounding tolerated, as a fraction of the pixel spacing (default 0.2)")
    q = p.add_argument_group("QC flag (needs_review in the manifest)")
    q.add_argument("--review-max-fraction", type=float, default=0.5, help="segmented share of the volume (default 0.5)")
    q.add_argument("--review-min-probability", type=float, default=0.8,
                   help="mean foreground probability below this needs review (default 0.8)")
    q.add_argument("--review-max-entropy", type=float, default=0.5,
                   help="mean normalised foreground entropy above this needs review (default 0.5)")
    r = p.add_argument_group("PACS (credentials: ULITE_PACS_TOKEN, ULITE_PACS_USER/ULITE_PACS_PASSWORD or netrc)")
    r.add_argument("--from", dest="source", metavar="URL",
                   help="pull from a DICOMweb server (dicomweb://HOST/PATH is HTTPS; http:// for loopback/test "
                   "servers)")
    r.add_argument("--study-uid", action="append", default=[], help="QIDO: StudyInstanceUID (repeatable)")
    r.add_argument("--series-uid", action="append", default=[], help="QIDO: SeriesInstanceUID (repeatable)")
    r.add_argument("--patient-id", help="QIDO: PatientID")
    r.add_argument("--study-date", help="QIDO: StudyDate, YYYYMMDD or a range YYYYMMDD-YYYYMMDD")
    r.add_argument("--modality", help="QIDO: Modality of the series, e.g. CT")
    r.add_argument("--series-description", help="QIDO: SeriesDescription (* wildcards)")
    r.add_argument("--push", action="append", default=[], metavar="URL",
                   help="send SEG/RTSTRUCT/SR to a DICOMweb server (STOW-RS) or dimse://AE@HOST:PORT (C-STORE); "
                   "repeatable")
    r.add_argument("--ca-bundle", help="CA certificate(s) to verify the servers' TLS certificates with")
    r.add_argument("--netrc", help="netrc file with credentials (default: $NETRC or ~/.netrc)")
    r.add_argument("--retries", type=int, default=3, help="attempts per download/push (default 3)")
    p.add_argument("--no-prefetch", action="store_true", help="read each series only when the previous one is finished")
    p.add_argument("--no-fuse", action="store_true",
                   help="run the network as defined (no BatchNorm folding); default: the config's use_fused")
    p.add_argument("--no-amp", action="store_true",
                   help="no mixed precision on CUDA; default: the config's amp (on where CUDA is available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--max-gap-ratio", type=float, default=3.0, help="largest/smallest slice gap still resampled (default 3)"
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="ID=JSON",
        help="override a config id, e.g. --set inferer#sw_batch_size=2",
    )
    s = p.add_argument_group(
        "scale-out (docs/scale_out.md): a Ray actor pool, or static shards for job arrays + 'ulite-dicom merge OUT'")
    s.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="segment on Ray workers that each hold the model once; ADDRESS of a running cluster "
                   "(HOST:PORT, auto, ray://HOST:10001) or none for a private loopback instance on this machine "
                   "(needs the ray extra: pip install 'ulite-monai[ray]')")
    s.add_argument("--workers", type=int, default=2, help="Ray workers (default 2)")
    s.add_argument("--cpus-per-worker", type=float, default=1.0, help="Ray CPUs per worker (default 1)")
    s.add_argument("--gpus-per-worker", type=float, default=0.0,
                   help="Ray GPUs per worker (default 0; 0.5 puts two workers on a GPU); > 0 runs the model on CUDA")
    s.add_argument("--num-shards", type=int, default=None, metavar="N",
                   help="split the input into N shards by a stable hash of each series key and run one of them "
                   "(SLURM arrays, Kubernetes Indexed Jobs); all shards write to the same OUTPUT")
    s.add_argument("--shard-id", type=int, default=None, metavar="K",
                   help="the shard to run, 0..N-1 (default: $SLURM_ARRAY_TASK_ID - $SLURM_ARRAY_TASK_MIN or "
                   "$JOB_COMPLETION_INDEX)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def build_merge_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ulite-dicom merge",
        description="After every shard (--num-shards) has finished: append the shard manifests to "
        "OUTPUT/manifest.jsonl, finish commits a killed shard left, write OUTPUT/batch_summary.json (final counts, "
        "each shard's figures, shards that never reported). Exit status: 0 all fine; 1 some series failed or "
        "shards are missing; 2 a shard is still running or OUTPUT is not an output folder.",
    )
    p.add_argument("output", type=Path, help="the shards' output folder")
    p.add_argument("--wait", action="store_true", help="wait for running shards instead of refusing")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    return p


def merge_main(argv: list[str]) -> int:
    """``ulite-dicom merge OUTPUT``."""
    import json

    from ulite_monai.batch.shards import ShardError, merge

    args = build_merge_parser().parse_args(argv)
    try:
        summary = merge(args.output, wait=args.wait)
    except (ShardError, FileNotFoundError) as e:
        print(f"ulite-dicom merge: {e}", file=sys.stderr)
        return 2
    c, sh = summary["counts"], summary.get("shards") or {}
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        shards = (f"; shards reported {len(sh['reported'])}/{sh['count']}" + (f", missing {sh['missing']}"
                  if sh["missing"] else "") + (f", {sh['series_per_minute_combined']} series/min together"
                  if sh.get("series_per_minute_combined") else "")) if sh else ""
        print(f"ulite-dicom merge: {summary['merged']['merged_rows']} rows merged; {summary['keys']} keys: "
              f"{c['done']} done, {c['empty']} empty, {c['failed']} failed, {c['skipped']} skipped{shards}; "
              f"summary {Path(args.output) / 'batch_summary.json'}")
    return 1 if c["failed"] or sh.get("missing") else 0


def main(argv: list[str] | None = None) -> int:
    import warnings

    # with the deploy extra installed, `import monai` loads holoscan, which warns about the stack size limit
    warnings.filterwarnings("ignore", message="Current stack size", category=RuntimeWarning)
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["merge"]:  # sub-command (an input folder named "merge": write ./merge)
        return merge_main(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if not args.verbose:
        import warnings

        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*nvImageCodec.*")
    from ulite_monai.batch.qc import ReviewRules
    from ulite_monai.batch.runner import BatchOptions, OutputFolderError, run_batch
    from ulite_monai.io.series_selection import load_selection_rules

    if not args.verbose:  # SaveImaged logs every file it writes; the manifest already records them
        logging.getLogger("monai.data.image_writer").setLevel(logging.WARNING)
        logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)

    source = push = None
    try:
        from ulite_monai.io.pacs import parse_address

        source = parse_address(args.source) if args.source else None
        push = [parse_address(u) for u in args.push]
    except ValueError as e:
        print(f"ulite-dicom: {e}", file=sys.stderr)
        return 2
    if source is not None and source.kind != "dicomweb":
        print("ulite-dicom: --from takes a DICOMweb address (dicomweb://, https://, http://)", file=sys.stderr)
        return 2
    if source is None and args.input is None:
        print("ulite-dicom: give an INPUT folder or --from URL", file=sys.stderr)
        return 2
    if source is not None and args.input is not None:
        print("ulite-dicom: give either an INPUT folder or --from URL, not both", file=sys.stderr)
        return 2
    if source is None and not args.input.exists():
        print(f"ulite-dicom: input {args.input} does not exist", file=sys.stderr)
        return 2
    rules = None
    if args.rules != "all":
        rules_path = Path(args.rules) if args.rules else Path(_default("configs/series_selection.json"))
        try:
            rules = load_selection_rules(rules_path)
        except ValueError as e:
            print(f"ulite-dicom: {e}", file=sys.stderr)
            return 2
    from ulite_monai.bundle import parse_overrides

    try:
        overrides = parse_overrides(args.set)
    except ValueError as e:
        print(f"ulite-dicom: --set: {e}", file=sys.stderr)
        return 2
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    opts = BatchOptions(
        input_dir=args.input,
        output_dir=args.output,
        bundle_dir=args.bundle,
        config_files=args.config,
        rules=rules,
        all_matched=False if args.first_match else None,
        device=args.device,
        checkpoint=args.checkpoint,
        allow_random_weights=args.random_weights,
        overwrite=args.overwrite,
        formats=[f for f in args.formats.split(",") if f.strip()],
        progress=not args.no_progress,
        prefetch=not args.no_prefetch,
        fuse=False if args.no_fuse else None,
        amp=False if args.no_amp else None,
        max_gap_ratio=args.max_gap_ratio,
        overrides=overrides,
        seg_type=args.seg_type,
        review=ReviewRules(args.review_max_fraction, args.review_min_probability, args.review_max_entropy),
        source=source,
        study_filters={k: v for k, v in (("PatientID", args.patient_id), ("StudyDate", args.study_date)) if v},
        series_filters={k: v for k, v in (("Modality", args.modality), ("SeriesDescription", args.series_description),
                                          ("SeriesInstanceUID", args.series_uid or None)) if v},
        study_uids=args.study_uid,
        push=push,
        ca_bundle=args.ca_bundle,
        netrc_file=args.netrc,
        attempts=max(1, args.retries),
    )
    if args.position_tolerance is not None:
        opts.position_tolerance = args.position_tolerance
    if args.ray is not None and args.num_shards is not None:
        print("ulite-dicom: use either --ray or --num-shards (a shard may not run on Ray)", file=sys.stderr)
        return 2
    if args.num_shards is not None or args.shard_id is not None:
        from ulite_monai.batch.shards import ShardError, shard_from_env

        try:
            opts.shard = shard_from_env(args.num_shards if args.num_shards is not None else 0, args.shard_id)
        except (ShardError, ValueError) as e:
            print(f"ulite-dicom: {e}", file=sys.stderr)
            return 2
    if args.ray is not None:
        from ulite_monai.batch.ray_runner import RayOptions, import_ray

        if args.workers < 1 or args.cpus_per_worker < 0 or args.gpus_per_worker < 0:
            print("ulite-dicom: --workers must be 1 or more, --cpus/--gpus-per-worker 0 or more", file=sys.stderr)
            return 2
        ray_opts = RayOptions(address=args.ray, workers=args.workers, cpus_per_worker=args.cpus_per_worker,
                              gpus_per_worker=args.gpus_per_worker, threads=args.threads,
                              in_flight=1 if args.no_prefetch else 2, verbose=args.verbose)
        try:
            import_ray(ray_opts.local)
        except RuntimeError as e:
            print(f"ulite-dicom: {e}", file=sys.stderr)
            return 2
        opts.ray = ray_opts
    try:
        summary = run_batch(opts)
    except OutputFolderError as e:
        print(f"ulite-dicom: {e}", file=sys.stderr)
        return 3
    except OSError as e:
        where = Path(e.filename).resolve() if e.filename else None
        if where is not None and Path(args.output).resolve() in [where, *where.parents]:
            print(f"ulite-dicom: cannot write the output folder {args.output}: {e.strerror or e}", file=sys.stderr)
            return 3
        print(f"ulite-dicom: {e}", file=sys.stderr)
        return 2
    except (KeyError, ValueError, RuntimeError) as e:
        print(f"ulite-dicom: {e}", file=sys.stderr)
        return 2
    c = summary["counts"]
    pushed = f", {c['push_failed']} with objects not pushed" if args.push else ""
    print(
        f"ulite-dicom: {c['done']} done, {c['empty']} empty, {c['failed']} failed, {c['skipped']} skipped, "
        f"{c['already_done']} already done, {c['needs_review']} need review{pushed}; "
        f"{summary['series_per_minute'] or 0} series/min; manifest "
        f"{opts.shard.manifest_path(args.output) if opts.shard else Path(args.output) / 'manifest.jsonl'}"
    )
    return 1 if c["failed"] else 4 if c["push_failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
