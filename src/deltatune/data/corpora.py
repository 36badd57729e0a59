"""Offline text beyond the tweets: movie reviews, product reviews and news editorials, with human sentiment.

They come from the VADER paper's evaluation sets (Hutto & Gilbert, ICWSM 2014), which the `vaderSentiment`
source distribution on PyPI ships (MIT licence) as `additional_resources/hutto_ICWSM_2014.tar.gz`; its wheel
does not. Every snippet was rated by 20 people from -4 (most negative) to +4, and the files hold the mean.

`make setup` downloads the pinned sdist (`pip download`, checked against its sha256) into the cache. On first
use each corpus is read out of it, without extracting anything else, and written once as a JSONL file with
the columns `id`, `rating`, `sentiment` and `text`, so every data format and reader works on it unchanged.

- `bundled:movie_reviews`: Pang & Lee's movie-review sentences (rotten tomatoes), two classes: `negative`
  (rating <= -0.5) and `positive` (>= 0.5); the 533 snippets in between are dropped. A different domain and a
  different label set from the tweets.
- `bundled:product_reviews`: Amazon product-review sentences, three classes split at +-0.5.
- `bundled:news`: New York Times editorial sentences, three classes split at +-0.5; general prose, the
  default text for the forgetting check.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

from ..core.atomic import atomic_path
from ..core.hashing import sha256_file
from .readers import DataError, read_rows

VADER_SDIST = "vaderSentiment-3.3.2.tar.gz"
VADER_REQUIREMENT = "vaderSentiment==3.3.2"
VADER_SHA256 = "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9"
_INNER_ARCHIVE = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
NEUTRAL_BAND = 0.5  # |mean rating| below this is neutral (ratings run from -4 to +4)

# corpus name -> (file inside the inner archive, whether neutral snippets are kept)
CORPORA = {
    "movie_reviews": ("hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt", False),
    "product_reviews": ("hutto_ICWSM_2014/amazonReviewSnippets_GroundTruth.txt", True),
    "news": ("hutto_ICWSM_2014/nytEditorialSnippets_GroundTruth.txt", True),
}


def sources_dir() -> Path:
    from ..models.bundled import cache_root

    return cache_root() / "sources"


def fetch_vader_sdist(dest: Path | None = None) -> Path:
    """The pinned sdist in the cache, downloaded from PyPI if missing; its sha256 is checked either way."""
    dest = dest or sources_dir()
    path = dest / VADER_SDIST
    if not path.exists():
        dest.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                   VADER_REQUIREMENT, "-d", str(dest)]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0 or not path.exists():
            raise DataError(f"could not download {VADER_REQUIREMENT} from PyPI: {done.stderr.strip()[-500:]}")
    digest = sha256_file(path)
    if digest != VADER_SHA256:
        path.unlink()
        raise DataError(f"{path} has sha256 {digest}, not the pinned {VADER_SHA256}; deleted it, fetch again")
    return path


def corpus_path(name: str) -> Path:
    """The JSONL file of corpus `name` (see the module docstring), built from the cached sdist once."""
    if name not in CORPORA:
        raise DataError(f"unknown corpus {name!r}; available: {sorted(CORPORA)}")
    target = sources_dir() / f"{name}.jsonl"
    if target.exists():
        return target
    sdist = sources_dir() / VADER_SDIST
    if not sdist.exists():
        raise DataError(
            f"bundled:{name} is read from the {VADER_REQUIREMENT} source distribution, which is not in "
            f"{sdist.parent}. Run `make setup`, or `python -m deltatune.data` to download it."
        )
    member, keep_neutral = CORPORA[name]
    rows = [
        row
        for row in _snippets(_read_member(fetch_vader_sdist(), member))
        if keep_neutral or row["sentiment"] != "neutral"
    ]
    with atomic_path(target) as tmp:
        tmp.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return target


def _read_member(sdist: Path, member: str) -> str:
    with tarfile.open(sdist, "r:gz") as outer:
        inner_bytes = outer.extractfile(_INNER_ARCHIVE).read()
    with tarfile.open(fileobj=io.BytesIO(inner_bytes), mode="r:gz") as inner:
        return inner.extractfile(member).read().decode("utf-8")


def _snippets(text: str) -> list[dict]:
    """Rows of `id <TAB> mean rating <TAB> text` (CRLF line ends) as records with a sentiment class."""
    rows = []
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) != 3:
            continue
        rating = float(parts[1])
        sentiment = "neutral" if abs(rating) < NEUTRAL_BAND else ("positive" if rating > 0 else "negative")
        rows.append({"id": parts[0], "rating": rating, "sentiment": sentiment, "text": parts[2].strip()})
    return rows


DEFAULT_CORPUS = "bundled:news"  # general text for the forgetting measures and the KL penalty


def read_corpus(source: str | Path = DEFAULT_CORPUS) -> tuple[list[str], str]:
    """Texts of a corpus and the sha256 of its file. A .txt file is one text per non-empty line; a
    .jsonl / .json / .csv / .tsv / .parquet file needs a `text` column. `bundled:news` (the default) is New
    York Times editorial sentences (data/corpora.py)."""
    from ..data.dataset import resolve_data_path

    path = resolve_data_path(str(source))
    if not path.is_file():
        raise DataError(f"corpus {path} does not exist; pass a .txt file (one text per line) or a .jsonl / .csv "
                        "file with a `text` column")  # fmt: skip
    if path.suffix.lower() == ".txt":
        try:
            texts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except UnicodeDecodeError as exc:
            raise DataError(f"corpus {path} is not UTF-8 text (byte {exc.start}: {exc.reason}); convert it, "
                            "e.g. iconv -f latin1 -t utf-8") from None  # fmt: skip
    else:
        rows, _ = read_rows(path)
        if rows and not any("text" in r.fields for r in rows):
            raise DataError(f"corpus {path} has no `text` column; its columns are {sorted(rows[0].fields)}")
        texts = [str(r.fields["text"]).strip() for r in rows if str(r.fields.get("text") or "").strip()]
    if not texts:
        raise DataError(f"corpus {path} holds no text; give it at least one non-empty line or `text` value")
    return texts, sha256_file(path)
