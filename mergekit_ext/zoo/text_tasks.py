"""Text classification tasks of the `text` zoo: data sources, parsers, registry, splits.

Built-in tasks read Debian data files (WordNet, fortunes, word lists). A user adds a
task from a JSONL file of `{"text": ..., "label": ...}` rows with `jsonl_task`.

Splits depend on the data alone. Examples are deduplicated on their case-folded
text, and a text seen with two labels is dropped. The rest are ordered by the
SHA-256 of that key, capped per class, and cut into test, validation and train in
that order. So no text lands in two splits, and every build gets the same splits.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mergekit_ext.errors import MergekitExtError

# Lexicographer file numbers of WordNet 3.x (the `lexnames` file of the WordNet
# distribution): the two-digit `lex_filenum` field of a synset line indexes this list.
LEXNAMES: tuple[str, ...] = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal",
    "noun.artifact", "noun.attribute", "noun.body", "noun.cognition",
    "noun.communication", "noun.event", "noun.feeling", "noun.food", "noun.group",
    "noun.location", "noun.motive", "noun.object", "noun.person", "noun.phenomenon",
    "noun.plant", "noun.possession", "noun.process", "noun.quantity", "noun.relation",
    "noun.shape", "noun.state", "noun.substance", "noun.time", "verb.body",
    "verb.change", "verb.cognition", "verb.communication", "verb.competition",
    "verb.consumption", "verb.contact", "verb.creation", "verb.emotion", "verb.motion",
    "verb.perception", "verb.possession", "verb.social", "verb.stative", "verb.weather",
    "adj.ppl",
)  # fmt: skip

# ss_type of a synset line -> part of speech; `s` marks adjective satellites
PART_OF_SPEECH = {"n": "noun", "v": "verb", "a": "adjective", "s": "adjective", "r": "adverb"}

# Fortune topics with at least 140 quotes each in Debian's `fortunes` package
FORTUNE_TOPICS: tuple[str, ...] = (
    "computers", "drugs", "education", "food", "law",
    "love", "politics", "science", "sports", "startrek",
)  # fmt: skip

# language label -> word list file name under /usr/share/dict and its Debian package
WORD_LISTS: dict[str, tuple[str, str]] = {
    "english": ("american-english", "wamerican"),
    "french": ("french", "wfrench"),
    "german": ("ngerman", "wngerman"),
    "italian": ("italian", "witalian"),
    "spanish": ("spanish", "wspanish"),
    "portuguese": ("portuguese", "wportuguese"),
    "dutch": ("dutch", "wdutch"),
    "swedish": ("swedish", "wswedish"),
}

# Debian packages that provide each fortune topic file (`dpkg -S` on Debian 12)
FORTUNES_MIN_TOPICS = frozenset({"fortunes", "literature", "riddles"})


class MissingDataError(MergekitExtError):
    """A data file a zoo task reads is not installed."""


@dataclass(frozen=True)
class Example:
    """One labeled input text."""

    text: str
    label: str


@dataclass(frozen=True)
class SourceFile:
    """A file a task reads, with the Debian package that installs it (empty for user files)."""

    path: Path
    debian_package: str = ""


@dataclass(frozen=True)
class DataPaths:
    """Folders of the Debian data files; tests point them at fixtures."""

    wordnet: Path = Path("/usr/share/wordnet")
    fortunes: Path = Path("/usr/share/games/fortunes")
    dictionaries: Path = Path("/usr/share/dict")


@dataclass(frozen=True)
class TextTask:
    """A classification task: where its data comes from and how it is read."""

    name: str
    description: str
    sources: Callable[[DataPaths], list[SourceFile]]
    read: Callable[[DataPaths], list[Example]]
    max_length: int = 64  # tokens kept per input; longer inputs are truncated
    max_per_class: int = 400  # cap that keeps large classes from drowning small ones


@dataclass
class TaskSplits:
    """Train, validation and test examples of one task plus bookkeeping."""

    labels: list[str]
    train: list[Example]
    validation: list[Example]
    test: list[Example]
    dropped_conflicts: int = 0
    duplicates: int = 0
    class_counts: dict[str, dict[str, int]] = field(default_factory=dict)


# ---------------------------------------------------------------- parsers


@dataclass(frozen=True)
class Synset:
    """The fields of one WordNet data-file line that the tasks use."""

    offset: str
    lexname: str
    part_of_speech: str
    words: tuple[str, ...]
    gloss: str

    @property
    def definition(self) -> str:
        """The gloss without its quoted usage examples."""
        return self.gloss.split('; "')[0].strip().rstrip(";").strip()


_ADJECTIVE_MARKER = re.compile(r"\((a|p|ip)\)$")


def parse_wordnet_line(line: str) -> Synset | None:
    """Parse a synset line of `data.{noun,verb,adj,adv}`; return None for license lines.

    Layout (wndb(5WN)): offset, lex_filenum (2 decimal digits), ss_type, w_cnt
    (2 hex digits), then w_cnt pairs of word and lex_id, pointers, and `| gloss`.
    """
    if not line.strip() or line.startswith(" "):
        return None
    data, separator, gloss = line.partition("|")
    if not separator:
        raise ValueError(f"invalid WordNet synset line (no '|' before the gloss): {line[:60]!r}")
    fields = data.split()
    offset, lex_filenum, ss_type, word_count = fields[:4]
    count = int(word_count, 16)
    words = tuple(_ADJECTIVE_MARKER.sub("", word) for word in fields[4 : 4 + 2 * count : 2])
    return Synset(
        offset=offset,
        lexname=LEXNAMES[int(lex_filenum)],
        part_of_speech=PART_OF_SPEECH[ss_type],
        words=words,
        gloss=gloss.strip(),
    )


def read_wordnet(path: Path) -> list[Synset]:
    """Read every synset of one WordNet data file."""
    synsets = []
    with open(path, encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, start=1):
            try:
                synset = parse_wordnet_line(line)
            except (ValueError, IndexError) as error:
                raise MergekitExtError(
                    f"{path}, line {number}: {error}. Reinstall the data: sudo apt-get install --reinstall wordnet-base"
                ) from error
            if synset is not None:
                synsets.append(synset)
    return synsets


def parse_fortunes(content: str) -> list[str]:
    """Split a fortune file into quotes: a line holding only `%` ends a quote.

    Whitespace inside a quote collapses to single spaces; empty quotes are skipped.
    """
    quotes = []
    current: list[str] = []
    for line in content.splitlines():
        if line.strip() == "%":
            quotes.append(" ".join(" ".join(current).split()))
            current = []
        else:
            current.append(line)
    quotes.append(" ".join(" ".join(current).split()))
    return [quote for quote in quotes if quote]


def parse_word_list(content: str) -> list[str]:
    """Return the words of a word list, one per line, without possessive `'s` forms."""
    words = []
    for line in content.splitlines():
        word = line.strip()
        if word and not word.endswith("'s"):
            words.append(word)
    return words


def read_text(path: Path) -> str:
    # The Debian word lists are UTF-8 since bookworm; replacement keeps a stray byte from failing the build
    return path.read_text(encoding="utf-8", errors="replace")


# ---------------------------------------------------------------- built-in tasks


def _wordnet_sources(paths: DataPaths, parts: Iterable[str]) -> list[SourceFile]:
    return [SourceFile(paths.wordnet / f"data.{part}", "wordnet-base") for part in parts]


def _read_wordnet_definitions(paths: DataPaths, part: str) -> list[Example]:
    return [
        Example(synset.definition, synset.lexname)
        for synset in read_wordnet(paths.wordnet / f"data.{part}")
        if synset.definition
    ]


def _read_part_of_speech(paths: DataPaths) -> list[Example]:
    examples = []
    for part in ("noun", "verb", "adj", "adv"):
        for synset in read_wordnet(paths.wordnet / f"data.{part}"):
            if synset.definition:
                examples.append(Example(synset.definition, synset.part_of_speech))
    return examples


def _read_noun_lemmas(paths: DataPaths) -> list[Example]:
    return [
        Example(word.replace("_", " "), synset.lexname)
        for synset in read_wordnet(paths.wordnet / "data.noun")
        for word in synset.words
    ]


def _fortune_sources(paths: DataPaths) -> list[SourceFile]:
    return [
        SourceFile(paths.fortunes / topic, "fortunes-min" if topic in FORTUNES_MIN_TOPICS else "fortunes")
        for topic in FORTUNE_TOPICS
    ]


def _read_fortunes(paths: DataPaths) -> list[Example]:
    return [
        Example(quote, topic)
        for topic in FORTUNE_TOPICS
        for quote in parse_fortunes(read_text(paths.fortunes / topic))
    ]


def _word_list_sources(paths: DataPaths) -> list[SourceFile]:
    return [SourceFile(paths.dictionaries / file, package) for file, package in WORD_LISTS.values()]


# Candidates kept per language before splitting. The lists contain 86k to 431k words,
# and hashing all of them for the split would cost more than the rest of the data step.
LANGID_CANDIDATES_PER_LANGUAGE = 4000


def _read_languages(paths: DataPaths) -> list[Example]:
    words_by_language = {
        language: parse_word_list(read_text(paths.dictionaries / file))
        for language, (file, _) in WORD_LISTS.items()
    }
    # a word found in several lists (case-folded) carries no language signal
    list_count: Counter[str] = Counter()
    for words in words_by_language.values():
        list_count.update({word.casefold() for word in words})

    examples = []
    for language, words in words_by_language.items():
        # an evenly spaced sample of the alphabetically sorted list covers every initial letter
        stride = max(1, len(words) // LANGID_CANDIDATES_PER_LANGUAGE)
        examples.extend(Example(word, language) for word in words[::stride] if list_count[word.casefold()] == 1)
    return examples


def builtin_tasks() -> dict[str, TextTask]:
    """Return the built-in tasks by name, in build order."""
    tasks = [
        TextTask(
            "wn-noun", "noun gloss -> noun supersense (26 WordNet lexicographer files)",
            lambda paths: _wordnet_sources(paths, ["noun"]),
            lambda paths: _read_wordnet_definitions(paths, "noun"),
            max_length=48, max_per_class=250,
        ),
        TextTask(
            "wn-verb", "verb gloss -> verb supersense (15 WordNet lexicographer files)",
            lambda paths: _wordnet_sources(paths, ["verb"]),
            lambda paths: _read_wordnet_definitions(paths, "verb"),
            max_length=48, max_per_class=400,
        ),
        TextTask(
            "wn-pos", "gloss -> part of speech (noun, verb, adjective, adverb)",
            lambda paths: _wordnet_sources(paths, ["noun", "verb", "adj", "adv"]),
            _read_part_of_speech,
            max_length=48, max_per_class=1000,
        ),
        TextTask(
            "wn-lemma", "noun lemma alone -> noun supersense",
            lambda paths: _wordnet_sources(paths, ["noun"]),
            _read_noun_lemmas,
            max_length=16, max_per_class=250,
        ),
        TextTask(
            "fortune-topic", "fortune quote -> its topic file (10 topics)",
            _fortune_sources, _read_fortunes,
            max_length=48, max_per_class=220,
        ),
        TextTask(
            "langid", "single word -> language of its word list (8 languages)",
            _word_list_sources, _read_languages,
            max_length=16, max_per_class=500,
        ),
    ]  # fmt: skip
    return {task.name: task for task in tasks}


# ---------------------------------------------------------------- user tasks


def read_jsonl_examples(path: Path) -> list[Example]:
    """Read `{"text": ..., "label": ...}` rows; raise naming the line of a bad row."""
    examples = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                text, label = row["text"], row["label"]
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise MergekitExtError(
                    f"{path}, line {number}: expected a JSON object with string keys "
                    f'"text" and "label" ({error}). Fix or remove that line.'
                ) from error
            if not isinstance(text, str) or not isinstance(label, (str, int)):
                raise MergekitExtError(
                    f'{path}, line {number}: "text" must be a string and "label" a string or integer.'
                )
            examples.append(Example(text, str(label)))
    return examples


def jsonl_task(name: str, path: str | Path, max_length: int = 64, max_per_class: int = 400) -> TextTask:
    """Define a task from a JSONL file of `{"text", "label"}` rows."""
    file = Path(path).expanduser().resolve()
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise MergekitExtError(
            f"Task name {name!r} is invalid: use letters, digits, '-', '_' and '.', starting with a letter or digit."
        )
    return TextTask(
        name, f"user task from {file}",
        lambda paths: [SourceFile(file)],
        lambda paths: read_jsonl_examples(file),
        max_length=max_length, max_per_class=max_per_class,
    )  # fmt: skip


# ---------------------------------------------------------------- checks and splits


def check_sources(task: TextTask, paths: DataPaths) -> list[SourceFile]:
    """Return the task's source files; raise MissingDataError naming each missing file and its fix."""
    sources = task.sources(paths)
    missing = [source for source in sources if not source.path.is_file()]
    if not missing:
        return sources
    names = ", ".join(str(source.path) for source in missing)
    packages = sorted({source.debian_package for source in missing if source.debian_package})
    if packages:
        fix = f"Install the Debian packages that provide them: sudo apt-get install -y {' '.join(packages)}"
    else:
        fix = "Check the path given for this task."
    raise MissingDataError(f"Task {task.name}: data file not found: {names}. {fix}")


def text_key(text: str) -> str:
    """Return the identity of a text for deduplication and splitting (case and spacing ignored)."""
    return " ".join(text.split()).casefold()


def text_hash(text: str) -> str:
    """Return the SHA-256 hex digest of a text's key; it orders examples for the splits."""
    return hashlib.sha256(text_key(text).encode("utf-8")).hexdigest()


def split_examples(
    examples: Sequence[Example],
    *,
    test_size: int,
    validation_size: int,
    train_size: int,
    max_per_class: int,
) -> TaskSplits:
    """Deduplicate, drop conflicting texts, cap each class and cut test/validation/train by hash.

    The cut is stratified: each class gives the same fraction of its capped examples to
    test and to validation, so the splits share one class distribution. Within a class
    the examples with the smallest hashes go to test, the next to validation, then train.
    """
    labels_by_key: dict[str, set[str]] = defaultdict(set)
    first_text: dict[str, str] = {}
    for example in examples:
        key = text_key(example.text)
        if not key:
            continue
        labels_by_key[key].add(example.label)
        first_text.setdefault(key, example.text)
    conflicts = sum(1 for labels in labels_by_key.values() if len(labels) > 1)

    by_class: dict[str, list[tuple[str, Example]]] = defaultdict(list)
    for key, labels in labels_by_key.items():
        if len(labels) == 1:
            label = next(iter(labels))
            by_class[label].append((text_hash(key), Example(first_text[key], label)))
    for members in by_class.values():
        members.sort(key=lambda item: item[0])
        del members[max_per_class:]

    pool_size = sum(len(members) for members in by_class.values())
    # test and validation take their requested sizes, but at most half of a small pool
    held_out_base = max(pool_size, 2 * (test_size + validation_size), 1)
    test: list[tuple[str, Example]] = []
    validation: list[tuple[str, Example]] = []
    train: list[tuple[str, Example]] = []
    for members in by_class.values():
        count = len(members)
        test_count = round(count * test_size / held_out_base)
        validation_count = round(count * validation_size / held_out_base)
        train_count = min(count - test_count - validation_count, round(count * train_size / max(pool_size, 1)))
        test.extend(members[:test_count])
        validation.extend(members[test_count : test_count + validation_count])
        train.extend(members[test_count + validation_count : test_count + validation_count + train_count])

    splits = {
        name: [example for _, example in sorted(split, key=lambda item: item[0])]
        for name, split in (("train", train), ("validation", validation), ("test", test))
    }
    class_counts = {
        name: dict(sorted(Counter(example.label for example in split).items())) for name, split in splits.items()
    }
    return TaskSplits(
        labels=sorted(by_class),
        train=splits["train"],
        validation=splits["validation"],
        test=splits["test"],
        dropped_conflicts=conflicts,
        duplicates=len(examples) - len(labels_by_key),
        class_counts=class_counts,
    )


def write_jsonl(path: Path, examples: Sequence[Example]) -> None:
    """Write examples as `{"text", "label"}` JSON lines."""
    with open(path, "w", encoding="utf-8") as handle:
        for example in examples:
            handle.write(json.dumps({"text": example.text, "label": example.label}, ensure_ascii=False) + "\n")
