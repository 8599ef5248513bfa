"""Batch inference over a JSONL data set (``tools/batch_infer.py``): one module per concern.

``requests`` (input scan, request parsing) -> ``validate`` (checks that need no model) -> ``resume`` (request
digests: which earlier results still hold) -> ``parts`` (per-shard result files, read back incrementally) ->
``schedule`` (encoding, grouping, left-padded batches) -> ``decode`` (one batch through the generation loop) ->
``merge`` (the output file, and the guard of an existing one) -> ``job`` (one process's part, tying them);
``layout`` (ranks and shards) and ``tracker`` (progress) serve the job. Imports: the library's runtime and
processing layers, and the pipeline.
"""

from .decode import generate_batch, pieces_from_tokens
from .job import BatchJob, Checked, JobOptions, describe_error, record_error
from .layout import Layout, make_layout
from .merge import check_output, is_our_line, merge_parts
from .parts import (FORMAT, PART_PREFIX, PART_SUFFIX, PartStore, PartWriter, RecordRef, part_files, part_path,
                    repair_tail)
from .requests import (GEN_FIELDS, MEDIA_FIELDS, REQUEST_FIELDS, InputIndex, JobError, Request, RequestError,
                       first_line, id_key, media_kind, parse_request, scan_input)
from .resume import Fingerprint, ResumePlan, file_identity, model_identity, plan_resume
from .schedule import Encoded, collate, encode_request, make_batches, settings_key
from .validate import check_settings, check_source, check_text, validate_line

__all__ = [
    "BatchJob", "Checked", "Encoded", "FORMAT", "Fingerprint", "GEN_FIELDS", "InputIndex", "JobError", "JobOptions",
    "Layout", "MEDIA_FIELDS", "PART_PREFIX", "PART_SUFFIX", "PartStore", "PartWriter", "REQUEST_FIELDS", "RecordRef",
    "Request", "RequestError", "ResumePlan", "check_output", "check_settings", "check_source", "check_text",
    "collate", "describe_error", "encode_request", "file_identity", "first_line", "generate_batch", "id_key",
    "is_our_line", "make_batches", "make_layout", "media_kind", "merge_parts", "model_identity", "parse_request",
    "part_files", "part_path", "pieces_from_tokens", "plan_resume", "record_error", "repair_tail", "scan_input",
    "settings_key", "validate_line",
]
