"""Scraping a metrics endpoint the way Prometheus does, and reading the samples back."""

from __future__ import annotations

import urllib.request
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families


@dataclass(frozen=True)
class Scrape:
    """One scrape: its text, and every sample as (name, labels, value)."""

    text: str
    samples: tuple[tuple[str, dict[str, str], float], ...]
    types: dict[str, str]

    def value(self, name: str, **labels: str) -> float:
        """The sum of the samples called ``name`` whose labels include ``labels``; 0 if none."""
        return sum(
            v
            for n, have, v in self.samples
            if n == name and all(have.get(k) == want for k, want in labels.items())
        )

    def __repr__(self) -> str:
        return f"<Scrape of {len(self.samples)} samples>"

    def has(self, name: str, **labels: str) -> bool:
        return any(
            n == name and all(have.get(k) == want for k, want in labels.items())
            for n, have, _ in self.samples
        )


def scrape(address: str, timeout: float = 10.0) -> Scrape:
    """GET http://ADDRESS/metrics, parsed with prometheus_client's text parser (blocking: from
    async code, run it in a thread, as the server reads on the event loop)."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=timeout) as response:
        text = response.read().decode()
    samples = []
    types = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for sample in family.samples:
            samples.append((sample.name, dict(sample.labels), sample.value))
    return Scrape(text, tuple(samples), types)
