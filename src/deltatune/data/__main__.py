"""`python -m deltatune.data`: download the pinned source distribution the offline corpora come from (what
`make setup` runs; see data/corpora.py)."""

from .corpora import fetch_vader_sdist

if __name__ == "__main__":
    print(fetch_vader_sdist())
