"""From a data file to the export plan: load with `datasets`, map columns, augment, tokenize, sort.

The plan is deterministic: rows are (example, copy) in dataset order, augmented with an RNG seeded by
(seed, example id, copy), tokenized, then sorted by length inside fixed windows to cut padding. Shard k
of the plan always holds the same rows, which is what makes resume and multi-rank export exact.
"""
from __future__ import annotations

import bisect
import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..cache.fingerprint import hash_files
from ..cache.format import encode_spans
from ..core.files import sha256_file
from ..augment import AUGMENTATIONS
from ..errors import CachebrewError, ConfigError

_EXT_FORMAT = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet",
               ".arrow": "arrow"}


@dataclass
class DataConfig:
    path: str = ""
    format: str | None = None          # csv / json / parquet / arrow / saved (load_from_disk); None: from extension
    split: str = "train"
    text: str | None = "text"          # column with the text (or None with `tokens`)
    text_pair: str | None = None
    tokens: str | None = None          # column with pre-split words (token-level tasks)
    messages: str | None = None        # column of chat conversations [{role, content}, ...]: rendered by the
                                       # tokenizer's chat template (causal-LM teachers), `text` unused
    label: str | None = "label"
    id: str | None = None              # column with a stable example id; None: the row index
    limit: int | None = None


@dataclass
class AugmentConfig:
    copies: int = 0                    # augmented copies per example
    include_original: bool = True
    seed: int = 0
    mode: str = "sequence"             # sequence: apply every op in turn; choice: one op drawn per copy
    ops: list = field(default_factory=list)  # [{"name": "masking", "p": 0.1}, ...]


def load_table(cfg: DataConfig):
    """The dataset as a `datasets.Dataset`, with every mapped column checked."""
    import datasets

    path = Path(cfg.path)
    if not path.exists():
        raise CachebrewError(f"data.path: no such file or directory: {path}")
    fmt = cfg.format or ("saved" if path.is_dir() else _EXT_FORMAT.get(path.suffix.lower()))
    if fmt is None:
        raise ConfigError(f"data.format: cannot tell the format of {path} from its extension; set data.format")
    datasets.disable_progress_bars()
    try:
        if fmt == "saved":
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if cfg.split not in ds:
                    raise ConfigError(f"data.split: {cfg.split!r} not in {path} (splits: {', '.join(ds)})")
                ds = ds[cfg.split]
        else:
            kwargs = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
            builder = "json" if fmt == "jsonl" else fmt
            ds = datasets.load_dataset(builder, data_files={cfg.split: str(path)}, split=cfg.split, **kwargs)
    except (ConfigError, CachebrewError):
        raise
    except Exception as e:  # datasets raises many types for unreadable files
        raise CachebrewError(f"data.path: cannot read {path} as {fmt}: {e}") from None
    missing = [(f"data.{k}", getattr(cfg, k)) for k in ("text", "text_pair", "tokens", "messages", "label", "id")
               if getattr(cfg, k) is not None and getattr(cfg, k) not in ds.column_names]
    if missing:
        raise ConfigError([f"{k}: column {v!r} not in {path} (columns: {', '.join(ds.column_names)})"
                           for k, v in missing])
    if cfg.limit is not None:
        ds = ds.select(range(min(cfg.limit, len(ds))))
    return ds


def data_fingerprint(cfg: DataConfig) -> str:
    path = Path(cfg.path)
    if path.is_dir():
        return hash_files([p for p in path.rglob("*") if p.is_file()])
    return sha256_file(path)


@dataclass
class PlanRow:
    id: str
    copy: int
    text: str | None
    text_pair: str | None
    words: list | None
    label: object


def _row_rng(seed: int, example_id: str, copy: int) -> np.random.RandomState:
    digest = hashlib.sha256(f"{seed}\0{example_id}\0{copy}".encode()).digest()
    return np.random.RandomState(int.from_bytes(digest[:4], "little"))


def augment_words(words: list, aug: AugmentConfig, rng, mask_token: str) -> list:
    ops = aug.ops if aug.mode == "sequence" else [aug.ops[rng.randint(len(aug.ops))]]
    for op in ops:
        params = {k: v for k, v in op.items() if k != "name"}
        if op["name"] == "masking":
            params.setdefault("mask", mask_token)
        words = AUGMENTATIONS[op["name"]](words, rng=rng, **params)
    return words


def label_vocabulary(values, teacher_label2id: dict | None) -> tuple[list | None, dict | None]:
    """Map string labels to ids: the teacher's label2id if it covers them, else sorted names."""
    flat = [v for x in values for v in (x if isinstance(x, list) else [x])]
    if not flat or all(isinstance(v, (int, np.integer)) for v in flat):
        return None, None
    names = sorted({str(v) for v in flat})
    if teacher_label2id and set(names) <= set(teacher_label2id):
        mapping = {k: int(v) for k, v in teacher_label2id.items()}
        return [k for k, _ in sorted(mapping.items(), key=lambda kv: kv[1])], mapping
    return names, {n: i for i, n in enumerate(names)}


def chat_renderer(tokenizer):
    """A function rendering one conversation ([{role, content}, ...]) to text with the tokenizer's chat template
    (as `apply_chat_template(..., tokenize=False)`; the text already holds the template's special tokens)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"data.messages: the tokenizer ({getattr(tokenizer, 'name_or_path', '') or 'given'}) has "
                          "no chat template; use a chat model's tokenizer (tokenizer: <path>) or a text column "
                          "(data.text)")

    def render(messages):
        return tokenizer.apply_chat_template(messages, tokenize=False)
    return render


def _conversation(value, i: int, example_id: str, column: str) -> list:
    ok = isinstance(value, list) and value and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                                   and isinstance(m.get("content"), str) for m in value)
    if not ok:
        raise CachebrewError(f"data.messages: row {i} (id {example_id}) of column {column!r} is not a conversation "
                             f"(a non-empty list of {{role, content}} strings): {str(value)[:80]}")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def build_rows(ds, cfg: DataConfig, aug: AugmentConfig, mask_token: str, render_chat=None) -> list[PlanRow]:
    """(example, copy) rows in dataset order; augmentation never touches copy 0. Chat data (``data.messages``)
    becomes the text `render_chat` (`chat_renderer`) makes of each conversation."""
    token_level = cfg.tokens is not None
    if token_level and aug.copies and any(op["name"] != "masking" for op in aug.ops):
        raise ConfigError("augment.ops: token-level data (data.tokens) supports only 'masking', which keeps "
                          "words aligned with their labels")
    if cfg.messages is not None and aug.copies and aug.ops:
        raise ConfigError("augment.ops: chat data (data.messages) is not augmented (word operations would break the "
                          "chat template's markup); copies without ops draw fresh sparse samples of the same rows")
    if cfg.messages is not None and render_chat is None:
        raise ConfigError("data.messages: chat data needs a tokenizer with a chat template to render it")
    columns = {k: ds[getattr(cfg, k)] if getattr(cfg, k) else None
               for k in ("text", "text_pair", "tokens", "messages", "label", "id")}
    ids = [str(x) for x in columns["id"]] if columns["id"] is not None else [str(i) for i in range(len(ds))]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise CachebrewError(f"data.id: column {cfg.id!r} is not unique (e.g. {dup!r} repeats)")
    copies = ([0] if aug.include_original else []) + list(range(1, aug.copies + 1))
    rows = []
    for i, example_id in enumerate(ids):
        text = columns["text"][i] if columns["text"] is not None else None
        if columns["messages"] is not None:
            text = render_chat(_conversation(columns["messages"][i], i, example_id, cfg.messages))
        pair = columns["text_pair"][i] if columns["text_pair"] is not None else None
        words = list(columns["tokens"][i]) if token_level else None
        label = columns["label"][i] if columns["label"] is not None else None
        if text is not None and not isinstance(text, str):
            raise CachebrewError(f"data.text: row {i} (id {example_id}) is {type(text).__name__}, not text")
        for c in copies:
            t, w = text, words
            if c > 0 and aug.ops and columns["messages"] is None:  # else the same text (fresh sparse draws)
                rng = _row_rng(aug.seed, example_id, c)
                if token_level:
                    w = augment_words(words, aug, rng, mask_token)
                else:
                    t = " ".join(augment_words(text.split(), aug, rng, mask_token))
            rows.append(PlanRow(example_id, c, t, pair, w, label))
    return rows


def _label_id(label, label_map: dict | None, row: PlanRow) -> int:
    if label_map is None:
        return int(label)
    try:
        return label_map[str(label)]
    except KeyError:
        raise CachebrewError(f"row {row.id!r}: label {label!r} is not in the label vocabulary "
                             f"{sorted(label_map, key=label_map.get)}") from None


def tokenize_rows(rows: list[PlanRow], tokenizer, max_length: int | None, label_map: dict | None, token_level: bool,
                  add_special_tokens: bool = True, spans: bool = False):
    """input_ids / attention_mask / token_type_ids and labels (aligned to first sub-words when token-level).

    ``add_special_tokens=False`` for text a chat template rendered: it already holds the model's special tokens.
    ``max_length=None``: whole documents, not truncated (`pack_rows` cuts them). ``spans``: also where each token
    lies ("offsets", or "word_ids" when token-level; cache/format.py), where the tokenizer is a fast one."""
    out = []
    step = 1000
    spans = spans and bool(getattr(tokenizer, "is_fast", False))
    for start in range(0, len(rows), step):
        chunk = rows[start:start + step]
        if token_level:
            enc = tokenizer([r.words for r in chunk], is_split_into_words=True, truncation=True, max_length=max_length)
        else:
            pairs = [r.text_pair for r in chunk] if chunk[0].text_pair is not None else None
            whole = {} if max_length is not None else {"verbose": False}  # no "longer than the model" warning
            enc = tokenizer([r.text for r in chunk], pairs, truncation=max_length is not None, max_length=max_length,
                            add_special_tokens=add_special_tokens, return_offsets_mapping=spans, **whole)
        for j, r in enumerate(chunk):
            item = {k: enc[k][j] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
            if spans and token_level:
                item["word_ids"] = [-1 if w is None else w for w in enc.word_ids(j)]
            elif spans:
                item["offsets"] = encode_spans(token_spans(enc["offset_mapping"][j], enc.sequence_ids(j), len(r.text)))
            if r.label is not None:
                if token_level:
                    tags = [_label_id(t, label_map, r) for t in r.label]
                    labels, prev = [], None
                    for w in enc.word_ids(j):
                        labels.append(-100 if w is None or w == prev or w >= len(tags) else tags[w])
                        prev = w
                    item["labels"] = labels
                else:
                    item["labels"] = _label_id(r.label, label_map, r)
            out.append(item)
    return out


def token_spans(offsets, sequence_ids, first_length: int) -> list[tuple[int, int]]:
    """A row's token spans [(start, end)] in the row's text, from a fast tokenizer's offset mapping; a pair's
    second text counts from ``first_length + 1`` (as if the two were joined by one character)."""
    out = []
    for (s, e), seq in zip(offsets, sequence_ids):
        shift = first_length + 1 if seq == 1 and e > s else 0
        out.append((s + shift, e + shift))
    return out


def decoded_spans(token_ids: list[int], text: str, decode) -> list[tuple[int, int]] | None:
    """Spans of a packed row's tokens in its decoded text, from decoding each token alone; None when the pieces do
    not join into the text (a tokenizer whose decoder adds or removes characters between tokens)."""
    pieces = [decode([t]) for t in token_ids]
    if "".join(pieces) != text:
        return None
    out, at = [], 0
    for p in pieces:
        out.append((at, at + len(p)))
        at += len(p)
    return out


def pack_rows(rows: list[PlanRow], tokens: list[dict], max_length: int, separator_id: int,
              decode, spans: bool = False) -> tuple[list[PlanRow], list[dict]]:
    """Documents concatenated and cut into rows of exactly ``max_length`` tokens (the last row of each copy
    shorter), as Hugging Face's run_clm.py ``group_texts`` and GPT-2-style pretraining do: no padding, no
    truncation. Each document ends with ``separator_id`` (the tokenizer's EOS) unless it already does, so the
    model sees where one ends; attention runs across the boundary, the same way in teacher and student.

    Each copy is packed on its own (fresh sampled draws of copy c stay apart from copy 0). A packed row's id is
    ``<id of the document it starts in>@<token offset in it>``, its text the decoded tokens, its label none, its
    token spans those of each token decoded alone (`decoded_spans`; left out for every row if one does not join).
    """
    extra = [k for k in ("attention_mask", "token_type_ids") if tokens and k in tokens[0]]
    fill = {"attention_mask": 1, "token_type_ids": 0}
    packed_rows, packed_tokens = [], []
    for copy in sorted({r.copy for r in rows}):
        ids, starts, doc_ids = [], [], []  # the copy's token stream; where each document starts in it
        for r, t in zip(rows, tokens):
            if r.copy != copy:
                continue
            starts.append(len(ids))
            doc_ids.append(r.id)
            ids.extend(t["input_ids"])
            if not t["input_ids"] or t["input_ids"][-1] != separator_id:
                ids.append(separator_id)
        for start in range(0, len(ids), max_length):
            chunk = ids[start:start + max_length]
            d = bisect.bisect_right(starts, start) - 1  # the document this row starts in
            text = decode(chunk)
            packed_rows.append(PlanRow(f"{doc_ids[d]}@{start - starts[d]}", copy, text, None, None, None))
            packed_tokens.append({"input_ids": chunk, **{k: [fill[k]] * len(chunk) for k in extra}})
            if spans:
                found = decoded_spans(chunk, text, decode)
                packed_tokens[-1]["offsets"] = None if found is None else encode_spans(found)
    if spans and any(t["offsets"] is None for t in packed_tokens):  # all rows or none: a cache's columns are whole
        bad = next(r.id for r, t in zip(packed_rows, packed_tokens) if t["offsets"] is None)
        logging.getLogger("cachebrew").warning(
            "packed rows carry no token spans: the tokens of row %s, decoded one by one, do not join into its text "
            "(byte pieces or a tokenizer that rewrites spaces); students with another tokenizer cannot align "
            "positions with this cache", bad)
        for t in packed_tokens:
            del t["offsets"]
    return packed_rows, packed_tokens


def pad_batch(examples: list[dict], pad_id: int = 0, labels: bool = True) -> dict:
    """Tokenized examples as one right-padded batch of tensors (labels padded with -100, the ignored index)."""
    n = max(len(e["input_ids"]) for e in examples)
    batch = {}
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        if key in examples[0]:
            pad = pad_id if key == "input_ids" else 0
            batch[key] = torch.tensor([e[key] + [pad] * (n - len(e[key])) for e in examples])
    if labels and "labels" in examples[0]:
        if isinstance(examples[0]["labels"], list):
            batch["labels"] = torch.tensor([e["labels"] + [-100] * (n - len(e["labels"])) for e in examples])
        else:
            batch["labels"] = torch.tensor([e["labels"] for e in examples])
    return batch


def sorted_order(lengths: list[int], window: int) -> list[int]:
    """Row order: longest first inside each window of `window` rows (stable), windows in dataset order."""
    order = []
    for start in range(0, len(lengths), window):
        idx = range(start, min(start + window, len(lengths)))
        order.extend(sorted(idx, key=lambda i: -lengths[i]))
    return order
