"""METEOR 1.5 through the jar that the pycocoevalcap wheel ships (the same program the COCO caption
evaluation runs), driven over the jar's own stdio protocol.

Why the jar and not a re-implementation: METEOR 1.5 aligns words by exact match, Porter stem, WordNet
synonym and a 61 MB paraphrase table, all of which ship inside that wheel; a Python copy would have to
reproduce the aligner's search to agree to 1e-3. So we run the jar (Java needed: Debian's
`default-jre-headless`), with the flags pycocoevalcap uses (`-l en -norm`), and no data is downloaded.

Protocol: for each sample the line `SCORE ||| ref_1 ||| ... ||| ref_k ||| hypothesis` answers with a
line of sufficient statistics; `EVAL ||| stats_1 ||| ... ||| stats_n` answers with one score per
sample and then the corpus score, which is computed from the summed statistics (not the mean of the
per-sample scores). Loading the paraphrase table takes the jar 5-15 s, so start one `Meteor` early
and score everything with it.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Sequence

JAR_ENV = "BIOMEDGPT_METEOR_JAR"  # overrides where the jar is taken from


class MeteorUnavailable(RuntimeError):
    """Java or the METEOR jar is missing."""


def meteor_jar() -> Path:
    """The METEOR 1.5 jar: $BIOMEDGPT_METEOR_JAR, else the one inside the installed pycocoevalcap."""
    if os.environ.get(JAR_ENV):
        jar = Path(os.environ[JAR_ENV])
    else:
        spec = importlib.util.find_spec("pycocoevalcap")  # a namespace package: no __init__, no origin
        if spec is None or not spec.submodule_search_locations:
            raise MeteorUnavailable("METEOR needs the pycocoevalcap package (it ships meteor-1.5.jar): "
                                    "pip install pycocoevalcap")
        jar = Path(list(spec.submodule_search_locations)[0]) / "meteor" / "meteor-1.5.jar"
    if not jar.is_file():
        raise MeteorUnavailable(f"{jar}: METEOR jar not found")
    return jar


def _clean(text: str) -> str:
    # The protocol is line- and '|||'-delimited: neither may occur inside a caption. Otherwise the text
    # goes in as pycocoevalcap sends it (which also turns a double space of the hypothesis into one).
    return text.replace("\r", " ").replace("\n", " ").replace("|||", "").replace("  ", " ")


class Meteor:
    """One running METEOR jar. Use as a context manager, or call `close()`."""

    def __init__(self, jar: str | os.PathLike | None = None, java: str | None = None, memory: str = "2G"):
        jar_path = Path(jar) if jar is not None else meteor_jar()
        java_exe = java or shutil.which("java")
        if java_exe is None:
            raise MeteorUnavailable("METEOR needs Java on PATH (Debian: apt-get install default-jre-headless)")
        self._stderr = tempfile.TemporaryFile()
        command = [java_exe, f"-Xmx{memory}", "-Dfile.encoding=UTF-8", "-jar", str(jar_path),
                   "-", "-", "-stdio", "-l", "en", "-norm"]
        # cwd: the jar finds its data/ (paraphrase table) beside itself
        self._process = subprocess.Popen(command, cwd=jar_path.parent, stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=self._stderr)

    def _ask(self, line: str) -> None:
        assert self._process.stdin is not None
        try:
            self._process.stdin.write((line + "\n").encode("utf-8"))
            self._process.stdin.flush()
        except BrokenPipeError as err:
            raise MeteorUnavailable(f"METEOR jar exited: {self._error_output()}") from err

    def _answer(self) -> str:
        assert self._process.stdout is not None
        line = self._process.stdout.readline()
        if not line:
            raise MeteorUnavailable(f"METEOR jar exited: {self._error_output()}")
        return line.decode("utf-8").strip()

    def _error_output(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read().decode("utf-8", "replace").strip()[-2000:] or "(no message)"

    def corpus_score(self, hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
        """Corpus METEOR (fraction) of tokenised hypotheses, each against its list of references."""
        return self.scores(hypotheses, references)[0]

    def scores(self, hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[float, list[float]]:
        """(corpus METEOR, per-sample METEOR)."""
        if len(hypotheses) != len(references) or not hypotheses:
            raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} reference sets")
        stats = []
        for hyp, refs in zip(hypotheses, references):
            self._ask(" ||| ".join(["SCORE", *(_clean(r) for r in refs), _clean(hyp)]))
            stats.append(self._answer())
        self._ask(" ||| ".join(["EVAL", *stats]))
        per_sample = [float(self._answer()) for _ in stats]
        return float(self._answer()), per_sample

    def close(self) -> None:
        if self._process.poll() is None:
            assert self._process.stdin is not None
            self._process.stdin.close()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        if self._process.stdout is not None:
            self._process.stdout.close()
        self._stderr.close()

    def __enter__(self) -> "Meteor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
