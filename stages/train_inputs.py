"""What a student trains on, checked against each other before anything is written.

``Inputs(config, log)`` opens the dataset and its teacher caches (verified, and built from this dataset), picks the
columns the student reads, checks the labels, sizes the student's outputs and checks that the student family fits
the data. It then builds the student, maps its layers to the teacher's hidden states, and makes the loaders.
``stages.trainer`` trains on it.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from torch import nn

from stages import cache_format as fmt
from stages.config import TrainStudentConfig
from stages.dataset import FINGERPRINT_OF, Dataset
from stages.errors import CacheError, ConfigError, DatasetError
from stages.hf_students import build_hf_student, is_hf_spec
from stages.loader import StreamingLoader
from stages.students import SEQUENCE, TOKEN, VECTOR, build_student, check_family_fits


class Inputs:
    """The dataset, its caches and the student's input columns and outputs, every check passed.

    token_level: a language model (one target per token) rather than one target per example; columns: the
    dataset columns the student reads; num_outputs: classes, or the teacher's vocabulary; temperature: the
    distillation temperature (--temperature, else the first cache's).
    """

    def __init__(self, config: TrainStudentConfig, log):
        c = self.config = config
        self.log = log
        self.data = Dataset(c.data)
        self.caches = [self.open_cache(ref, self.data) for ref in c.cache]
        self._check_caches()
        self.token_level = (
            self.caches[0].kind == "token"
            if self.caches
            else "input_ids" in self.data.columns and not self.data.has_labels
        )
        self.columns = self._input_columns()
        kind = TOKEN if self.token_level else SEQUENCE if "input_ids" in self.columns else VECTOR
        check_family_fits(c.student, kind, self.columns)
        if c.alpha < 1 and not self.token_level:
            self._check_labels()
        self.num_outputs = self.caches[0].num_classes if self.caches else self._count_outputs()
        if not self.token_level:
            self.check_label_range(self.data)
        cached_at = sorted({cache.temperature for cache in self.caches})
        if not c.temperature and len(cached_at) > 1:
            raise ConfigError(
                f"the caches were made at different temperatures {cached_at}, so there is no one cache T to train "
                "at: give --temperature"
            )
        self.temperature = c.temperature or (self.caches[0].temperature if self.caches else 1.0)

    def open_cache(self, ref: str, data: Dataset) -> fmt.Cache:
        cache = fmt.open_cache(fmt.resolve_cache(ref, self.config.cache_dir))
        cache.verify(checksums=True)
        if not cache.checksummed:
            self.log(f"note: cache {cache.key} predates manifest checksums; checked against its key and shards only")
        built_from = cache.manifest["dataset"]
        # A cache written before fingerprints hashed the rows holds a fingerprint of the files' names and bytes.
        have = data.fingerprint() if built_from.get("fingerprint_of") == FINGERPRINT_OF else data.file_fingerprint()
        want = built_from["fingerprint"]
        if have != want:
            raise CacheError(
                f"cache {cache.key} was built from another dataset ({cache.manifest['dataset']['path']}, fingerprint "
                f"{want[:12]}) than {data.path} (fingerprint {have[:12]}). Use the cache of this dataset "
                "or run cache-teacher on it."
            )
        return cache

    def _check_caches(self) -> None:
        if not self.caches:
            return
        first = self.caches[0]
        for cache in self.caches[1:]:
            if cache.kind != first.kind or cache.num_classes != first.num_classes:
                raise CacheError(
                    f"caches disagree: {first.key} is {first.kind} with {first.num_classes} outputs, "
                    f"{cache.key} is {cache.kind} with {cache.num_classes}; an ensemble needs one output space"
                )
        if any(cache.format.drawn for cache in self.caches) and self.config.method == "ensemble":
            raise CacheError(
                "--method ensemble mixes top-k caches; sampled caches train with --method kd or progressive"
            )
        if self.config.method == "progressive" and not first.hidden:
            raise CacheError(
                f"--method progressive needs hidden states, and cache {first.key} holds none. "
                "Re-run cache-teacher with --hidden NAME (see `pipeline inspect-teacher`)."
            )

    def _input_columns(self) -> list[str]:
        """The dataset columns the student reads: the token ids, or float vector column(s) concatenated in order.

        Vector columns are those of --inputs, else the teacher's float inputs, else (no cache) the dataset's one
        float column: with several and no teacher to say which, the user names them.
        """
        columns, floats = self.data.columns, _float_columns(self.data)
        if self.config.inputs:
            chosen = self.config.inputs
            if self.token_level or "input_ids" in chosen:
                raise ConfigError(
                    f"--inputs {','.join(chosen)}: --inputs picks float vector columns for a vector student; "
                    "token students read input_ids (and attention_mask) without it"
                )
            bad = [name for name in chosen if name not in floats]
            if bad:
                raise DatasetError(
                    f"--inputs: {bad} of dataset {self.data.path} are not float vector columns; "
                    f"its float columns are {floats or 'none'} (all columns: {columns})"
                )
            return list(chosen)
        if self.token_level:
            cols = ["input_ids"]  # the loader builds the mask; token-level students read ids only
        elif self.caches:
            teacher = [i["name"] for i in self.caches[0].manifest["teacher"]["inputs"]]
            present = [n for n in teacher if n in columns]
            cols = present if "input_ids" in present else [n for n in present if n in floats]
        elif "input_ids" in columns:
            cols = ["input_ids"]
        elif len(floats) > 1:
            raise ConfigError(
                f"dataset {self.data.path} has several float columns {floats} and no teacher cache says which the "
                f"student reads; name them with --inputs, e.g. --inputs {floats[0]} or --inputs {','.join(floats)}"
            )
        else:
            cols = floats
        if not cols or any(col not in columns for col in cols):
            raise DatasetError(
                f"dataset {self.data.path} has no model input column the student can read (token ids 'input_ids' "
                f"or a float vector column); it has {columns}"
            )
        return cols

    def _check_labels(self) -> None:
        if not self.data.has_labels or self.data.labels().null_count == self.data.num_rows:
            fix = (
                "use --alpha 1 to train on the teacher's targets alone"
                if self.caches
                else "cache a teacher on it (cache-teacher) and train on its targets with --cache and --alpha 1"
            )
            raise DatasetError(
                f"alpha {self.config.alpha} < 1 needs labels, but dataset {self.data.path} has none; {fix}"
            )

    def check_label_range(self, data: Dataset) -> None:
        """Labels must be class indices the student's outputs cover: 0 <= label < num_outputs (nulls allowed)."""
        if not data.has_labels:
            return
        low, high = pc.min_max(data.labels()).values()
        if low.as_py() is None:  # every label is null
            return
        if low.as_py() < 0:
            raise DatasetError(
                f"dataset {data.path} has label {low.as_py()}; labels are class indices 0..{self.num_outputs - 1} "
                "(null, not a negative number, for an unlabelled row)"
            )
        if high.as_py() >= self.num_outputs:
            width, fix = (
                (
                    f"the cache's teacher has {self.num_outputs} classes (cache {self.caches[0].key})",
                    f"use the cache of a teacher with at least {high.as_py() + 1} classes",
                )
                if self.caches
                else (
                    f"the student has {self.num_outputs} outputs, the largest label of {self.data.path} + 1",
                    "train on a dataset that holds every class",
                )
            )
            raise DatasetError(
                f"dataset {data.path} has label {high.as_py()}, outside the classes 0..{self.num_outputs - 1}: "
                f"{width}. Fix the labels, or {fix}"
            )

    def _count_outputs(self) -> int:
        """Outputs of a student trained without a teacher cache (cross-entropy only).

        Token level: the vocabulary of the held-out caches' teacher when one is given (so the student is scored
        against that teacher, like the KD runs it is compared with), else the largest token id + 1 in the data.
        Classification: the largest label + 1 (``_check_labels`` has made sure there are labels).
        """
        c = self.config
        if self.token_level:
            for data_path, ref in ((c.eval_data, c.eval_cache), (c.test_data, c.test_cache)):
                if data_path and ref:
                    return fmt.open_cache(fmt.resolve_cache(ref, c.cache_dir)).num_classes
            return self._max_token() + 1
        return int(pc.max(self.data.labels()).as_py()) + 1

    def _max_token(self) -> int:
        paths = [self.data] + [Dataset(p) for p in (self.config.eval_data, self.config.test_data) if p]
        return max(int(pc.max(pc.list_flatten(d.read(0, d.num_rows, ["input_ids"]).column(0))).as_py()) for d in paths)

    # -- the student and its data --------------------------------------------------------------------------
    def build_student(self) -> nn.Module:
        c = self.config
        if is_hf_spec(c.student):
            return build_hf_student(
                c.student,
                num_outputs=self.num_outputs,
                token_level=self.token_level,
                tokenizer_sha=self.data.tokenizer_sha256,
            )
        if self.token_level or "input_ids" in self.columns:
            vocab = self.num_outputs if self.token_level else self._max_token() + 1
            return build_student(
                c.student, num_outputs=self.num_outputs, vocab_size=vocab, wider_outputs=c.truncate_vocab
            )
        first = self.data.read(0, 1, self.columns)
        shapes = {name: np.asarray(first.column(name)[0].as_py()).shape for name in self.columns}
        return build_student(c.student, num_outputs=self.num_outputs, input_dim=shapes, wider_outputs=c.truncate_vocab)

    def vocab_limit(self, width: int) -> int | None:
        """Teacher V when the student's output ``width`` is wider (padded vocabulary) and truncation was asked for."""
        if not self.caches:
            return None
        teacher = self.caches[0].num_classes
        if width == teacher:
            return None
        if width > teacher and self.config.truncate_vocab:
            return teacher
        hint = (
            " (the student's vocabulary is padded; pass --truncate-vocab to train on its first V logits)"
            if width > teacher
            else ""
        )
        raise ConfigError(
            f"the student has {width} outputs but the cache's teacher has {teacher}: "
            f"they differ by {width - teacher}{hint}"
        )

    def layer_map(self, layers: int) -> list[tuple[int, str]]:
        """(student layer, teacher hidden name) pairs, in student-layer order, for a student of ``layers`` layers."""
        available = sorted(self.caches[0].hidden)
        if layers == 0:
            raise ConfigError(
                f"--method progressive: student {self.config.student!r} returns no hidden states to match the "
                "teacher's; its forward must return (logits, [hidden, ...]) or a StudentOutput with them"
            )
        if self.config.layer_map:
            pairs = []
            for item in self.config.layer_map.split(","):
                left, _, right = item.partition("=")
                if not left.strip().isdigit() or right.strip() not in available or not int(left) < layers:
                    raise ConfigError(
                        f"layer_map item {item!r}: want STUDENT_LAYER=TEACHER_HIDDEN with layer < {layers} "
                        f"and hidden one of {available}"
                    )
                pairs.append((int(left), right.strip()))
            layers_named = [layer for layer, _ in pairs]
            repeated = sorted({layer for layer in layers_named if layers_named.count(layer) > 1})
            if repeated:
                raise ConfigError(f"layer_map names student layer(s) {repeated} more than once; give each once")
            return sorted(pairs)
        if len(available) > layers:
            available = available[-layers:]
        # Spread the teacher's hidden states evenly over the student's layers, last to last.
        return [(round((j + 1) * layers / len(available)) - 1, name) for j, name in enumerate(available)]

    def loader(
        self,
        data: Dataset,
        caches: list,
        shuffle: bool,
        hidden=None,
        top_k: int | None = None,
        labelled_only=False,
        rank: int = 0,
        world_size: int = 1,
    ) -> StreamingLoader:
        """``rank`` of ``world_size``: this rank's share only (the training set); held-out sets are read whole."""
        return StreamingLoader(
            data,
            caches,
            input_columns=self.columns,
            batch_size=self.config.batch_size,
            token_level=self.token_level,
            hidden=hidden,
            shuffle=shuffle,
            buffer_examples=self.config.buffer,
            seed=self.config.seed,
            top_k=self.config.top_k if top_k is None else top_k,
            labelled_only=labelled_only,
            rank=rank,
            world_size=world_size,
        )

    def held_out(self, data_path: str, cache_ref: str) -> StreamingLoader | None:
        """The loader of a held-out dataset (with its teacher cache, if given), or None when none was given."""
        if not data_path:
            return None
        data = Dataset(data_path)
        if not self.token_level:
            self.check_label_range(data)
        caches = [self.open_cache(cache_ref, data)] if cache_ref else []
        if caches and not caches[0].format.exact_logp:
            raise CacheError(
                f"cache {caches[0].key} of {data_path} holds sampled targets; agreement and KL need a top-k cache of it"
            )
        if caches and caches[0].num_classes != self.num_outputs:
            raise CacheError(
                f"cache {caches[0].key} of {data_path} is of a teacher with {caches[0].num_classes} classes, but the "
                f"student predicts {self.num_outputs}; give a cache of the training teacher over {data_path}"
            )
        return self.loader(data, caches, shuffle=False, top_k=0)  # held-out KL over every cached id


def _float_columns(data: Dataset) -> list[str]:
    """Columns holding (possibly nested) lists of floats: the candidates for a vector student's input."""
    found = []
    for name in data.columns:
        kind, depth = data.schema.field(name).type, 0
        while pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
            kind, depth = kind.value_type, depth + 1
        if depth and pa.types.is_floating(kind):
            found.append(name)
    return found
