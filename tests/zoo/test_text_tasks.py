"""Parsers, splits and data checks of the text zoo tasks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mergekit_ext.errors import MergekitExtError
from mergekit_ext.zoo.text_tasks import (
    LEXNAMES,
    DataPaths,
    Example,
    MissingDataError,
    builtin_tasks,
    check_sources,
    jsonl_task,
    parse_fortunes,
    parse_wordnet_line,
    parse_word_list,
    split_examples,
    text_hash,
)

# Real lines of WordNet 3.1 data files (Debian wordnet-base), pointers shortened
NOUN_LINE = (
    "00074790 04 n 0b blunder 0 blooper 0 bloomer 0 bungle 0 pratfall 0 foul-up 0 fuckup 0 flub 0 "
    "botch 0 boner 0 boo-boo 0 001 @ 00070965 n 0000 | an embarrassing mistake  \n"
)
VERB_LINE = (
    "00002325 29 v 01 respire 1 005 $ 00001740 v 0000 @ 02108395 v 0000 + 03110323 a 0101 "
    "+ 00831191 n 0103 + 00830811 n 0101 01 + 02 00 | undergo the biomedical and metabolic processes "
    "of respiration by taking up oxygen and producing carbon monoxide  \n"
)
SATELLITE_LINE = (
    "00020103 00 s 02 outback(a) 0 remote 0 003 & 00019874 a 0000 + 05085165 n 0202 "
    "+ 08505110 n 0101 | inaccessible and sparsely populated;  \n"
)
ADVERB_LINE = '00001740 02 r 01 a_cappella 0 000 | without musical accompaniment; "they performed a cappella"  \n'


def test_lexnames_table_matches_wordnet_numbers() -> None:
    assert len(LEXNAMES) == 45
    assert LEXNAMES[0] == "adj.all"
    assert LEXNAMES[2] == "adv.all"
    assert LEXNAMES[3] == "noun.Tops"
    assert LEXNAMES[28] == "noun.time"
    assert LEXNAMES[29] == "verb.body"
    assert LEXNAMES[43] == "verb.weather"
    assert LEXNAMES[44] == "adj.ppl"
    assert sum(name.startswith("noun.") for name in LEXNAMES) == 26
    assert sum(name.startswith("verb.") for name in LEXNAMES) == 15


def test_wordnet_noun_line_hex_word_count() -> None:
    synset = parse_wordnet_line(NOUN_LINE)
    assert synset is not None
    assert synset.lexname == "noun.act"
    assert synset.part_of_speech == "noun"
    # 0b hexadecimal = 11 words
    assert len(synset.words) == 11
    assert synset.words[0] == "blunder"
    assert synset.words[-1] == "boo-boo"
    assert synset.definition == "an embarrassing mistake"


def test_wordnet_verb_line_lexname() -> None:
    synset = parse_wordnet_line(VERB_LINE)
    assert synset is not None
    assert synset.lexname == "verb.body"
    assert synset.part_of_speech == "verb"
    assert synset.words == ("respire",)
    assert synset.definition.startswith("undergo the biomedical")


def test_wordnet_satellite_and_adverb() -> None:
    satellite = parse_wordnet_line(SATELLITE_LINE)
    adverb = parse_wordnet_line(ADVERB_LINE)
    assert satellite is not None and adverb is not None
    assert satellite.part_of_speech == "adjective"
    assert satellite.words == ("outback", "remote")
    assert satellite.definition == "inaccessible and sparsely populated"
    assert adverb.part_of_speech == "adverb"
    assert adverb.lexname == "adv.all"
    assert adverb.definition == "without musical accompaniment"


def test_wordnet_license_lines_skipped() -> None:
    assert parse_wordnet_line("  1 This software and database is being provided to you, the LICENSEE, by  \n") is None


def test_fortune_percent_separators() -> None:
    content = "First line\n  of one quote.\n%\nSecond quote.\n%\n%\nLast quote without a separator\n"
    assert parse_fortunes(content) == [
        "First line of one quote.",
        "Second quote.",
        "Last quote without a separator",
    ]


def test_word_list_drops_possessives() -> None:
    assert parse_word_list("apple\napple's\nZürich\n\nBob's\n") == ["apple", "Zürich"]


def write_word_lists(folder: Path) -> DataPaths:
    words = {
        "american-english": ["house", "table", "table's", "window", "Berlin"],
        "french": ["maison", "table", "fenêtre"],
        "ngerman": ["Haus", "Tisch", "Fenster", "berlin"],
        "italian": ["casa", "tavolo"],
        "spanish": ["casa", "mesa", "ventana"],
        "portuguese": ["janela", "mesa"],
        "dutch": ["huis", "tafel"],
        "swedish": ["hus", "bord", "fönster"],
    }
    for name, entries in words.items():
        (folder / name).write_text("\n".join(entries) + "\n", encoding="utf-8")
    return DataPaths(wordnet=folder, fortunes=folder, dictionaries=folder)


def test_langid_drops_words_of_several_lists(tmp_path: Path) -> None:
    examples = builtin_tasks()["langid"].read(write_word_lists(tmp_path))
    texts = {example.text: example.label for example in examples}
    # "table" is English and French, "casa" Italian and Spanish, "mesa" Spanish and
    # Portuguese, "Berlin"/"berlin" English and German after case folding
    for shared in ("table", "casa", "mesa", "Berlin", "berlin", "table's"):
        assert shared not in texts
    assert texts["house"] == "english"
    assert texts["Haus"] == "german"
    assert texts["fönster"] == "swedish"
    assert texts["janela"] == "portuguese"


def make_examples(count: int, classes: int) -> list[Example]:
    return [Example(f"text number {index}", f"class{index % classes}") for index in range(count)]


def test_split_deterministic_and_disjoint() -> None:
    examples = make_examples(1000, 4)
    first = split_examples(examples, test_size=100, validation_size=80, train_size=500, max_per_class=1000)
    second = split_examples(list(reversed(examples)), test_size=100, validation_size=80, train_size=500, max_per_class=1000)
    assert first.test == second.test
    assert first.validation == second.validation
    assert first.train == second.train
    test_texts = {example.text for example in first.test}
    validation_texts = {example.text for example in first.validation}
    train_texts = {example.text for example in first.train}
    assert not test_texts & validation_texts
    assert not test_texts & train_texts
    assert not validation_texts & train_texts
    assert len(first.test) == 100
    assert len(first.validation) == 80
    assert len(first.train) == 500


def test_split_test_holds_smallest_hashes() -> None:
    examples = make_examples(200, 1)
    splits = split_examples(examples, test_size=20, validation_size=20, train_size=100, max_per_class=1000)
    ordered = sorted(examples, key=lambda example: text_hash(example.text))
    assert splits.test == ordered[:20]
    assert splits.validation == ordered[20:40]


def test_split_stratified_and_capped() -> None:
    examples = make_examples(900, 3)[:600] + [Example(f"rare {index}", "rare") for index in range(60)]
    splits = split_examples(examples, test_size=66, validation_size=66, train_size=1000, max_per_class=100)
    for name in ("train", "validation", "test"):
        counts = splits.class_counts[name]
        # every class is capped at 100 before the cut, so each gives the same share
        assert len(set(counts.values())) <= 2, counts
        assert set(counts) == {"class0", "class1", "class2", "rare"}
    total = {label: sum(splits.class_counts[name][label] for name in ("train", "validation", "test")) for label in splits.labels}
    assert total == {"class0": 100, "class1": 100, "class2": 100, "rare": 60}


def test_split_drops_conflicts_and_duplicates() -> None:
    examples = [
        Example("Same text", "a"),
        Example("same  TEXT", "a"),  # a duplicate after case and space folding
        Example("torn text", "a"),
        Example("Torn text", "b"),  # the same text with another label: dropped
        *make_examples(40, 2),
    ]
    splits = split_examples(examples, test_size=5, validation_size=5, train_size=100, max_per_class=100)
    texts = [example.text.casefold() for split in (splits.train, splits.validation, splits.test) for example in split]
    assert "torn text" not in texts
    assert texts.count("same text") == 1
    assert splits.dropped_conflicts == 1


def test_missing_data_names_file_and_apt_line(tmp_path: Path) -> None:
    empty = DataPaths(wordnet=tmp_path, fortunes=tmp_path, dictionaries=tmp_path)
    with pytest.raises(MissingDataError) as wordnet_error:
        check_sources(builtin_tasks()["wn-noun"], empty)
    assert str(tmp_path / "data.noun") in str(wordnet_error.value)
    assert "apt-get install -y wordnet-base" in str(wordnet_error.value)

    with pytest.raises(MissingDataError) as words_error:
        check_sources(builtin_tasks()["langid"], empty)
    message = str(words_error.value)
    assert str(tmp_path / "ngerman") in message
    assert "wamerican" in message
    assert "wngerman" in message
    assert "wswedish" in message

    with pytest.raises(MissingDataError) as fortune_error:
        check_sources(builtin_tasks()["fortune-topic"], empty)
    assert "apt-get install -y fortunes" in str(fortune_error.value)


def test_build_refuses_missing_data_before_training(tmp_path: Path) -> None:
    from mergekit_ext.zoo.text import build_text_zoo

    empty = DataPaths(wordnet=tmp_path / "none", fortunes=tmp_path / "none", dictionaries=tmp_path / "none")
    with pytest.raises(MissingDataError, match="wordnet-base"):
        build_text_zoo(tmp_path / "zoo", tasks=["wn-pos"], paths=empty)
    assert not (tmp_path / "zoo").exists()


def test_jsonl_task_reads_rows(tmp_path: Path) -> None:
    path = tmp_path / "sentiment.jsonl"
    rows = [{"text": "great film", "label": "positive"}, {"text": "dull plot", "label": 0}]
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n\n", encoding="utf-8")
    task = jsonl_task("sentiment", path)
    assert task.read(DataPaths()) == [Example("great film", "positive"), Example("dull plot", "0")]
    assert check_sources(task, DataPaths())[0].path == path


def test_jsonl_task_bad_row_names_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok", "label": "a"}\n{"text": "no label"}\n', encoding="utf-8")
    with pytest.raises(MergekitExtError, match="line 2"):
        jsonl_task("bad", path).read(DataPaths())


def test_jsonl_task_name_checked(tmp_path: Path) -> None:
    with pytest.raises(MergekitExtError, match="invalid"):
        jsonl_task("../escape", tmp_path / "x.jsonl")


def test_split_small_pool_keeps_half_for_training() -> None:
    splits = split_examples(make_examples(60, 2), test_size=400, validation_size=300, train_size=2500, max_per_class=400)
    assert len(splits.test) == 18
    assert len(splits.validation) == 12
    assert len(splits.train) == 30


def test_yaml_config_defines_tasks(tmp_path: Path) -> None:
    from mergekit_ext.zoo.text_config import load_text_tasks_config

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "mood.jsonl").write_text('{"text": "yay", "label": "happy"}\n', encoding="utf-8")
    config = tmp_path / "tasks.yaml"
    config.write_text("tasks:\n  - name: mood\n    jsonl: data/mood.jsonl\n    max_length: 32\n", encoding="utf-8")
    (task,) = load_text_tasks_config(config)
    assert task.name == "mood"
    assert task.max_length == 32
    assert task.read(DataPaths()) == [Example("yay", "happy")]


def test_yaml_config_missing_file(tmp_path: Path) -> None:
    from mergekit_ext.zoo.text_config import load_text_tasks_config

    config = tmp_path / "tasks.yaml"
    config.write_text("tasks:\n  - name: mood\n    jsonl: nowhere.jsonl\n", encoding="utf-8")
    with pytest.raises(MergekitExtError, match="nowhere.jsonl"):
        load_text_tasks_config(config)


def test_cache_folder_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from mergekit_ext.zoo.cache import zoo_folder

    monkeypatch.delenv("MERGEKIT_EXT_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert zoo_folder("text", "1") == tmp_path / "xdg" / "mergekit-ext" / "zoo" / "text-1"
    monkeypatch.setenv("MERGEKIT_EXT_CACHE", str(tmp_path / "own"))
    assert zoo_folder("text", "1") == tmp_path / "own" / "zoo" / "text-1"
