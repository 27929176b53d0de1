"""Conversations -> fixed-length training rows (the batch format in docs/design.md).

Sources: the built-in ShareGPT dump (a JSON array cut off mid-record), any local `.json` array, `.jsonl`
or `.parquet` with `messages` (OpenAI style), `conversations` (ShareGPT style) or `text` columns, and any
`datasets` hub name. Conversations are rendered with the teacher's chat template; the loss mask keeps
assistant tokens (or all tokens). A seeded permutation puts the first conversations into the held-out
set, so held-out text is never trained on whatever `max_conversations` is. The result is cached with
`datasets` under the asset cache, keyed by source, tokenizer and data config.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from distill.assets import asset_path, cache_root
from distill.files import atomic_dir
from distill.recipe import DataConfig, RecipeError

logger = logging.getLogger(__name__)

BUILTIN_DATA = "sharegpt"
COLUMNS = ("input_ids", "attention_mask", "position_ids", "labels")  # a row, and a batch of rows (batch format)
IGNORE_INDEX = -100  # a label that is no training target
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant", "assistant": "assistant",
         "system": "system"}
_FORMAT_VERSION = 1  # bump when the row layout changes so old caches are not reused


# ----------------------------------------------------------------------------- the batch contract


def model_inputs(batch: dict) -> dict:
    """What both models see. No attention_mask: padding is on the right (so causal attention never lets a
    real token see it), and only without a 2D mask and without a cache does transformers derive the
    block-diagonal mask from position_ids that keeps packed documents apart (Mamba layers reset their state
    on the same position_ids). Hence also `use_cache=False`, which training wants anyway."""
    return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}


def loss_positions(labels):
    """(B, L) bool tensor: True at position t when labels[t + 1] is a training target (unshifted HF labels)."""
    mask = labels.new_zeros(labels.shape).bool()
    mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return mask


# ----------------------------------------------------------------------------- reading records


@dataclass
class ParseStats:
    records: int = 0
    bytes_dropped: int = 0  # the unfinished record at a cut, plus anything unparsable after it
    skipped_roles: Counter = field(default_factory=Counter)
    conversations_dropped: int = 0  # records with no assistant turn left after role mapping


def iter_json_array(path: str | Path, stats: ParseStats, chunk_chars: int = 1 << 20) -> Iterator[dict]:
    """Yield the objects of a JSON array one at a time, tolerating a file cut off mid-record.

    Memory stays O(largest record + chunk). Whatever cannot be decoded once the file ends is counted
    in `stats.bytes_dropped` instead of raising.
    """
    decoder = json.JSONDecoder()
    with open(path, encoding="utf-8-sig") as f:
        buf, pos, eof = f.read(chunk_chars).lstrip(), 1, False
        if not buf.startswith("["):
            raise RecipeError(f"data.source = {str(path)!r}: expected a JSON array of records")
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n,":
                pos += 1
            if pos < len(buf) and buf[pos] == "]":
                return
            try:
                record, end = decoder.raw_decode(buf, pos)
                complete = end < len(buf) or eof  # a value ending exactly at the chunk edge may continue
            except json.JSONDecodeError:
                complete = False
            if complete:
                stats.records += 1
                yield record
                pos = end
                continue
            if eof:
                stats.bytes_dropped += len(buf[pos:].encode("utf-8"))
                return
            more = f.read(chunk_chars)
            eof = not more
            buf, pos = buf[pos:] + more, 0


def check_source(cfg: DataConfig) -> None:
    """Fail fast on a data source that cannot work (cheap: no download, no torch)."""
    path = Path(cfg.source).expanduser()
    if cfg.source == BUILTIN_DATA or path.is_file() and path.suffix in (".json", ".jsonl", ".parquet"):
        return
    if path.suffix in (".json", ".jsonl", ".parquet") and not path.exists():
        raise RecipeError(f"data.source = {cfg.source!r}: file not found; fix the path or use the built-in 'sharegpt'")
    if path.exists() or cfg.source.startswith((".", "/", "~")):
        raise RecipeError(f"data.source = {cfg.source!r}: use a .json, .jsonl or .parquet file, or a datasets name")


def _read_records(cfg: DataConfig, stats: ParseStats) -> Iterator[dict]:
    check_source(cfg)
    if cfg.source == BUILTIN_DATA:
        yield from iter_json_array(asset_path("sharegpt"), stats)
        return
    path = Path(cfg.source).expanduser()
    if path.suffix == ".json":
        with open(path, encoding="utf-8-sig", errors="replace") as f:
            if f.read(4096).lstrip().startswith("["):
                yield from iter_json_array(path, stats)
                return
    import datasets

    try:
        if path.is_file():
            builder = "parquet" if path.suffix == ".parquet" else "json"
            rows = datasets.load_dataset(builder, data_files=str(path), split="train")
        else:
            rows = datasets.load_dataset(cfg.source, split=cfg.split)
    except (OSError, ValueError) as err:  # not found, offline, bad format: the first line says which
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise RecipeError(f"data.source = {cfg.source!r}: could not load it with datasets ({first})") from None
    for row in rows:
        stats.records += 1
        yield row


def to_document(record: dict, stats: ParseStats) -> list[dict] | str | None:
    """A record as chat messages [{role, content}], or its plain `text`, or None if nothing is usable."""
    if isinstance(record.get("text"), str) and not ("messages" in record or "conversations" in record):
        return record["text"] or None
    turns = record.get("messages") or record.get("conversations") or []
    messages = []
    for turn in turns if isinstance(turns, list) else []:
        if not isinstance(turn, dict):
            continue
        role = turn.get("role", turn.get("from"))
        content = turn.get("content", turn.get("value"))
        if role not in ROLES or not isinstance(content, str):
            stats.skipped_roles[str(role)] += 1
            continue
        if ROLES[role] == "assistant" and not any(m["role"] != "system" for m in messages):
            stats.skipped_roles["assistant before any user turn"] += 1
            continue
        messages.append({"role": ROLES[role], "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        stats.conversations_dropped += 1
        return None
    return messages


# ----------------------------------------------------------------------------- tokenizing


def tokenize_conversation(messages: list[dict] | str, tokenizer, loss_on: str, max_length: int):
    """(input_ids, loss_mask) for one document, truncated to `max_length`.

    Assistant spans are found by rendering prefixes: the text of turn i is what `messages[:i+1]` adds
    to `messages[:i]` plus the generation prompt. This works with any prefix-stable chat template,
    including ones without `{% generation %}` markers (SmolLM2's). Plain text is trained on every token.
    """
    if isinstance(messages, str):
        ids = tokenizer(messages, add_special_tokens=True)["input_ids"] + [tokenizer.eos_token_id]
        ids = ids[:max_length]
        return ids, [1] * len(ids)
    if tokenizer.chat_template is None:
        raise RecipeError("data: the teacher's tokenizer has no chat template; use an instruct teacher or text data")

    def render(msgs, prompt=False):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=prompt)

    text = render(messages)
    spans = []
    if loss_on == "assistant":
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            upto = render(messages[: i + 1])
            if not text.startswith(upto):
                raise RecipeError("data.loss_on = 'assistant': the chat template is not prefix-stable; use 'all'")
            head = render(messages[:i], prompt=True)
            start = len(head) if text.startswith(head) else len(render(messages[:i]))
            spans.append((start, len(upto)))
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True,
                         truncation=True, max_length=max_length)
    ids = encoding["input_ids"]
    if loss_on == "all":
        return ids, [1] * len(ids)
    mask = [int(any(s <= begin < e for s, e in spans)) for begin, _ in encoding["offset_mapping"]]
    return ids, mask


def _row(docs: list[tuple[list[int], list[int]]], max_length: int, pad_id: int) -> dict:
    """Pack documents into one row: position_ids restart per document, the first token of each is no target.

    Padding sits on the right with attention_mask 0, labels -100 and its own positions 0.. so that
    position-based packing detection sees it as a separate (ignored) segment.
    """
    input_ids, position_ids, labels = [], [], []
    for ids, mask in docs:
        input_ids += ids
        position_ids += range(len(ids))
        labels += [IGNORE_INDEX] + [t if m else IGNORE_INDEX for t, m in zip(ids[1:], mask[1:])]
    pad = max_length - len(input_ids)
    return {
        "input_ids": input_ids + [pad_id] * pad,
        "attention_mask": [1] * len(input_ids) + [0] * pad,
        "position_ids": position_ids + list(range(pad)),
        "labels": labels + [IGNORE_INDEX] * pad,
    }


def _rows(docs: Iterator[tuple[list[int], list[int]]], cfg: DataConfig, pad_id: int) -> Iterator[dict]:
    """Greedy packing in order (or one document per row when `packing` is off)."""
    current, used = [], 0
    for ids, mask in docs:
        if current and (not cfg.packing or used + len(ids) > cfg.max_length):
            yield _row(current, cfg.max_length, pad_id)
            current, used = [], 0
        current.append((ids, mask))
        used += len(ids)
    if current:
        yield _row(current, cfg.max_length, pad_id)


# ----------------------------------------------------------------------------- building and caching


def _cache_key(cfg: DataConfig, tokenizer, seed: int) -> str:
    path = Path(cfg.source).expanduser()
    if path.is_file():
        st = path.stat()
        source = [str(path.resolve()), st.st_size, st.st_mtime_ns]
    else:
        source = [cfg.source, cfg.split]
    vocab = hashlib.sha1(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()
    ident = [_FORMAT_VERSION, source, tokenizer.name_or_path, vocab, tokenizer.chat_template,
             cfg.model_dump(mode="json"), seed]
    return hashlib.sha1(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]


def split_order(cfg: DataConfig, seed: int, stats: ParseStats) -> list[tuple[dict, list[dict] | str]]:
    """Every usable (record, document) in the order the split takes them: the held-out set first, then training
    (documents without a target inside max_length are skipped later, when tokenized)."""
    pairs = [(r, d) for r in _read_records(cfg, stats) if (d := to_document(r, stats))]
    random.Random(seed).shuffle(pairs)
    return pairs


def _build(cfg: DataConfig, tokenizer, seed: int):
    import datasets

    stats = ParseStats()
    documents = [document for _, document in split_order(cfg, seed, stats)]
    logger.info(
        "data %s: %d records, %d usable documents, %d dropped (no assistant turn), %d bytes cut off at "
        "the end, skipped turns by role: %s", cfg.source, stats.records, len(documents),
        stats.conversations_dropped, stats.bytes_dropped, dict(stats.skipped_roles) or "none",
    )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    skipped = Counter()

    def tokenized():
        for document in documents:
            ids, mask = tokenize_conversation(document, tokenizer, cfg.loss_on, cfg.max_length)
            if sum(mask[1:]) == 0:  # e.g. the first assistant turn starts after max_length
                skipped["no target"] += 1
                continue
            yield ids, mask

    stream = tokenized()
    held_out = [_row([doc], cfg.max_length, pad_id) for doc in itertools.islice(stream, cfg.held_out_size)]
    train = list(_rows(itertools.islice(stream, cfg.max_conversations), cfg, pad_id))
    if len(held_out) < cfg.held_out_size or not train:
        raise RecipeError(
            f"data.held_out_size = {cfg.held_out_size}: {cfg.source!r} gave {len(held_out)} held-out and "
            f"{len(train)} train rows ({skipped['no target']} documents had no target token within max_length "
            f"= {cfg.max_length}); lower held_out_size, raise max_length or use more data"
        )
    logger.info("data: %d train rows, %d held-out rows (one never-trained conversation each), %d documents "
                "without target tokens skipped", len(train), len(held_out), skipped["no target"])
    features = datasets.Features({name: datasets.Sequence(datasets.Value("int64")) for name in COLUMNS})
    return (datasets.Dataset.from_list(train, features=features),
            datasets.Dataset.from_list(held_out, features=features), stats)


def build_datasets(cfg: DataConfig, tokenizer, seed: int):
    """(train, held_out) `datasets.Dataset`s of rows in the batch format, built once and then cached."""
    import datasets

    target = cache_root() / "datasets" / _cache_key(cfg, tokenizer, seed)
    if (target / "held_out").is_dir():
        logger.info("data: reusing cached rows in %s", target)
        return datasets.load_from_disk(str(target / "train")), datasets.load_from_disk(str(target / "held_out"))
    train, held_out, stats = _build(cfg, tokenizer, seed)
    with atomic_dir(target, replace=False) as tmp:  # another process may build it concurrently
        train.save_to_disk(str(tmp / "train"))
        held_out.save_to_disk(str(tmp / "held_out"))
        (tmp / "stats.json").write_text(json.dumps({
            "records": stats.records, "bytes_dropped": stats.bytes_dropped, "skipped_roles": stats.skipped_roles,
            "conversations_dropped": stats.conversations_dropped}))
    return datasets.load_from_disk(str(target / "train")), datasets.load_from_disk(str(target / "held_out"))
