"""Data: the truncation-tolerant JSON parser, role mapping, loss masks, packing, split, cache."""

import json

import pytest

from distill.data import (
    COLUMNS,
    ParseStats,
    build_datasets,
    check_source,
    iter_json_array,
    to_document,
    tokenize_conversation,
)
from distill.recipe import DataConfig, RecipeError


def sharegpt_records(n):
    return [
        {"id": f"c{i}", "conversations": [
            {"from": "human", "value": f"question {i}: why é→ü? " + "x" * (i % 7)},
            {"from": "gpt", "value": f"answer {i} " + "y" * (i % 5)},
        ]}
        for i in range(n)
    ]


# ----------------------------------------------------------------------------- parser


@pytest.mark.parametrize(("chunk_chars", "encoding"), [(1, "utf-8"), (7, "utf-8-sig"), (64, "utf-8"), (1 << 20, "utf-8")])
def test_parser_reads_complete_array(tmp_path, chunk_chars, encoding):
    records = sharegpt_records(12)
    path = tmp_path / "full.json"
    path.write_text(json.dumps(records, indent=2, ensure_ascii=False), encoding=encoding)  # utf-8-sig: with a BOM
    stats = ParseStats()
    assert list(iter_json_array(path, stats, chunk_chars=chunk_chars)) == records
    assert stats.records == 12 and stats.bytes_dropped == 0


def test_parser_keeps_every_complete_record_at_any_cut(tmp_path):
    """Cut the file at every byte: exactly the records that end before the cut survive, the rest is counted."""
    records = sharegpt_records(5)
    pieces = [json.dumps(r, ensure_ascii=False).encode("utf-8") for r in records]
    data = b"[\n" + b",\n".join(pieces) + b"\n]"
    ends = [2 + sum(len(p) + 2 for p in pieces[:k]) + len(pieces[k]) for k in range(len(pieces))]
    for cut in range(2, len(data) + 1):
        blob = data[:cut].decode("utf-8", errors="ignore")  # a cut inside a multi-byte char drops it
        path = tmp_path / "cut.json"
        path.write_text(blob, encoding="utf-8")
        stats = ParseStats()
        got = list(iter_json_array(path, stats, chunk_chars=16))
        kept = sum(end <= cut for end in ends)
        assert got == records[:kept], cut
        tail = b"" if kept == len(records) else blob.encode("utf-8")[ends[kept - 1] if kept else 1:]
        assert stats.bytes_dropped == len(tail.lstrip(b",\n ")), cut


def test_parser_rejects_non_array(tmp_path):
    path = tmp_path / "obj.json"
    path.write_text('{"a": 1}')
    with pytest.raises(RecipeError, match="expected a JSON array"):
        list(iter_json_array(path, ParseStats()))


# ----------------------------------------------------------------------------- records -> documents


def test_roles_are_mapped_and_unknown_ones_counted():
    stats = ParseStats()
    record = {"conversations": [
        {"from": "gpt", "value": "orphan answer from a split conversation"},
        {"from": "system", "value": "be nice"},
        {"from": "human", "value": "hi"},
        {"from": "bing", "value": "ignored"},
        {"from": "chatgpt", "value": "hello"},
        {"from": "human", "value": "bye"},
        {"from": "gpt", "value": "ciao"},
    ]}
    assert to_document(record, stats) == [
        {"role": "system", "content": "be nice"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "bye"},
        {"role": "assistant", "content": "ciao"},
    ]
    assert stats.skipped_roles == {"bing": 1, "assistant before any user turn": 1}
    assert to_document({"conversations": [{"from": "human", "value": "only a question"}]}, stats) is None
    assert stats.conversations_dropped == 1
    assert to_document({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
                       stats) == [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    assert to_document({"text": "plain"}, stats) == "plain"


def test_assistant_mask_covers_exactly_the_assistant_turns(tiny_tokenizer):
    messages = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4, ünd more"},
                {"role": "user", "content": "and 3+3?"}, {"role": "assistant", "content": "6"}]
    ids, mask = tokenize_conversation(messages, tiny_tokenizer, "assistant", max_length=4096)
    assert tiny_tokenizer.decode(ids) == tiny_tokenizer.apply_chat_template(messages, tokenize=False)
    kept = tiny_tokenizer.decode([t for t, m in zip(ids, mask) if m])
    assert kept == "4, ünd more<|im_end|>\n6<|im_end|>\n"
    ids_all, mask_all = tokenize_conversation(messages, tiny_tokenizer, "all", max_length=4096)
    assert ids_all == ids and all(mask_all)
    short, short_mask = tokenize_conversation(messages, tiny_tokenizer, "assistant", max_length=20)
    assert short == ids[:20] and short_mask == mask[:20]


# ----------------------------------------------------------------------------- rows, split and cache


def write_messages(path, n):
    rows = [{"messages": [{"role": "user", "content": f"q{i} " + "w" * (i % 9)},
                          {"role": "assistant", "content": f"a{i} " + "z" * (i % 4)}]} for i in range(n)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return rows


def documents(row):
    """Split a row back into its documents using position_ids (an independent reading of the format)."""
    docs, start = [], 0
    n = sum(row["attention_mask"])
    for t in range(1, n + 1):
        if t == n or row["position_ids"][t] == 0:
            docs.append((start, t))
            start = t
    return docs


@pytest.mark.parametrize("packing", [True, False])
def test_rows_follow_the_batch_format(tmp_path, cache, tiny_tokenizer, packing):
    source = tmp_path / "chat.jsonl"
    write_messages(source, 40)
    cfg = DataConfig(source=str(source), max_length=256, packing=packing, held_out_size=5)
    train, held_out = build_datasets(cfg, tiny_tokenizer, seed=0)
    assert len(held_out) == 5 and list(train.column_names) == list(COLUMNS)
    all_docs = {"train": [], "held_out": []}
    for split, rows in (("train", train), ("held_out", held_out)):
        for row in rows:
            n = sum(row["attention_mask"])
            assert all(len(row[c]) == 256 for c in COLUMNS)
            assert row["attention_mask"] == [1] * n + [0] * (256 - n)
            assert row["labels"][n:] == [-100] * (256 - n)
            assert row["position_ids"][n:] == list(range(256 - n))
            spans = documents(row)
            assert len(spans) == 1 or (packing and split == "train")
            for start, end in spans:
                assert row["position_ids"][start:end] == list(range(end - start))
                assert row["labels"][start] == -100  # the first token of a document is never a target
                ids = row["input_ids"][start:end]
                text = tiny_tokenizer.decode(ids)
                expected_ids, mask = tokenize_conversation(
                    [{"role": "user", "content": text.split("user\n")[1].split("<|im_end|>")[0]},
                     {"role": "assistant", "content": text.split("assistant\n")[1].split("<|im_end|>")[0]}],
                    tiny_tokenizer, "assistant", 256)
                assert ids == expected_ids
                assert row["labels"][start + 1:end] == [t if m else -100 for t, m in zip(ids[1:], mask[1:])]
                all_docs[split].append(tuple(ids))
    assert len(all_docs["train"]) == 35 and not set(all_docs["train"]) & set(all_docs["held_out"])
    if packing:
        assert len(train) < 35


def test_split_is_deterministic_and_seeded(tmp_path, cache, tiny_tokenizer):
    source = tmp_path / "chat.jsonl"
    write_messages(source, 30)
    cfg = DataConfig(source=str(source), max_length=64, packing=False, held_out_size=4)
    first = build_datasets(cfg, tiny_tokenizer, seed=0)[1]["input_ids"]
    again = build_datasets(cfg, tiny_tokenizer, seed=0)[1]["input_ids"]
    other = build_datasets(cfg, tiny_tokenizer, seed=1)[1]["input_ids"]
    assert first == again and first != other
    # held-out rows do not depend on how much training data is asked for
    limited = DataConfig(source=str(source), max_length=64, packing=False, held_out_size=4, max_conversations=3)
    train, held_out = build_datasets(limited, tiny_tokenizer, seed=0)
    assert held_out["input_ids"] == first and len(train) == 3


def test_cache_is_reused_and_keyed_by_config(tmp_path, cache, tiny_tokenizer, monkeypatch):
    import distill.data

    source = tmp_path / "chat.jsonl"
    write_messages(source, 20)
    cfg = DataConfig(source=str(source), max_length=64, held_out_size=2)
    train, _ = build_datasets(cfg, tiny_tokenizer, seed=0)
    monkeypatch.setattr(distill.data, "_build", lambda *a: pytest.fail("cache was not reused"))
    assert build_datasets(cfg, tiny_tokenizer, seed=0)[0]["input_ids"] == train["input_ids"]
    with pytest.raises(pytest.fail.Exception, match="cache was not reused"):
        build_datasets(DataConfig(source=str(source), max_length=64, held_out_size=2, loss_on="all"),
                       tiny_tokenizer, seed=0)


def test_text_parquet_and_truncated_json_sources(tmp_path, cache, tiny_tokenizer):
    import datasets

    parquet = tmp_path / "text.parquet"
    datasets.Dataset.from_dict({"text": [f"document number {i}" for i in range(12)]}).to_parquet(str(parquet))
    train, held_out = build_datasets(DataConfig(source=str(parquet), max_length=32, held_out_size=2),
                                     tiny_tokenizer, seed=0)
    row = held_out[0]
    n = sum(row["attention_mask"])
    assert tiny_tokenizer.decode(row["input_ids"][:n]).startswith("document number ")
    assert row["input_ids"][n - 1] == tiny_tokenizer.eos_token_id
    assert row["labels"][1:n] == row["input_ids"][1:n]  # text trains on every token

    cut = tmp_path / "sharegpt.json"
    cut.write_text(json.dumps(sharegpt_records(10), indent=2)[:-150])
    train, held_out = build_datasets(DataConfig(source=str(cut), max_length=256, packing=False, held_out_size=2),
                                     tiny_tokenizer, seed=0)
    assert len(train) + len(held_out) == 9  # the tenth record was cut


def test_source_errors_are_one_line(tmp_path, cache, tiny_tokenizer):
    with pytest.raises(RecipeError, match=r"data.source = '.*missing.jsonl': file not found"):
        check_source(DataConfig(source=str(tmp_path / "missing.jsonl")))
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(RecipeError, match="use a .json, .jsonl or .parquet file"):
        check_source(DataConfig(source=str(tmp_path / "notes.txt")))
    source = tmp_path / "few.jsonl"
    write_messages(source, 3)
    with pytest.raises(RecipeError, match="lower held_out_size") as err:
        build_datasets(DataConfig(source=str(source), held_out_size=3), tiny_tokenizer, seed=0)
    assert "\n" not in str(err.value)


def test_hub_dataset_name_goes_through_datasets(cache, tiny_tokenizer):
    """The hub is unreachable here (HF_HUB_OFFLINE=1): the real load_dataset path must fail in one line."""
    with pytest.raises(RecipeError, match="could not load it with datasets") as err:
        build_datasets(DataConfig(source="some-org/some-chat-data"), tiny_tokenizer, seed=0)
    assert "\n" not in str(err.value)


def test_real_sharegpt_file_is_parsed_to_the_cut():
    from distill.assets import asset_path

    path = asset_path("sharegpt")
    stats = ParseStats()
    usable = sum(to_document(r, stats) is not None for r in iter_json_array(path, stats))
    size = path.stat().st_size
    print(f"ShareGPT: {stats.records} records, {usable} usable, {stats.conversations_dropped} without an "
          f"assistant turn, {stats.bytes_dropped} of {size} bytes cut, skipped {dict(stats.skipped_roles)}")
    assert 17_000 <= stats.records <= 18_000
    assert 0 < stats.bytes_dropped < 1_000_000  # the file really is cut mid-record
    assert usable > 17_000


@pytest.mark.slow
def test_real_sharegpt_rows_with_the_real_tokenizer(smollm2):
    _, tokenizer = smollm2
    cfg = DataConfig(max_length=256, held_out_size=4, max_conversations=40)
    train, held_out = build_datasets(cfg, tokenizer, seed=0)
    row = train[0]
    targets = [t for t in row["labels"] if t != -100]
    assert 0 < len(targets) < sum(row["attention_mask"])  # prompts are masked, answers are not
    assert len(held_out) == 4 and all(len(r) == 256 for r in train["input_ids"])
