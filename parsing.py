"""
Dependency parsing on Universal Dependencies English EWT: reading CoNLL-U, decoding scores to a well-formed tree,
and the attachment scores. The pieces of the coming `--task ud_ewt` that need no model.

    sentences, skipped = read_conllu("samples/en_ewt-ud-dev-sample.conllu")
    heads = decode_tree(scores)                 # scores (n+1, n+1): scores[d, h] for word d under head h, 0 = ROOT
    print(attachment_scores(pred_heads, pred_labels, gold_heads, gold_labels))   # {"uas": ..., "las": ...}

Data: UD English EWT v2.15 (CC BY-SA 4.0), the files named in UD_FILES with the sentence counts in UD_COUNTS. A
small sample of the dev file for the tests is in samples/; the full treebank is never committed.

Tests: python -m pytest -q test_all.py -k "conllu or tree or attachment"
"""

import gzip
from dataclasses import dataclass, field

import numpy as np

UD_FILES = {"train": "en_ewt-ud-train.conllu.gz", "dev": "en_ewt-ud-dev.conllu.gz", "test": "en_ewt-ud-test.conllu.gz"}
UD_COUNTS = {"train": 12544, "dev": 2001, "test": 2077}  # sentences in each file of release 2.15


@dataclass
class Sentence:
    words: list = field(default_factory=list)  # FORM of each syntactic word, in order (ids 1..n)
    upos: list = field(default_factory=list)  # universal part-of-speech tag
    heads: list = field(default_factory=list)  # HEAD: the id of the word's head, 0 for the root
    deprels: list = field(default_factory=list)  # DEPREL with its subtype (e.g. "obl:tmod")

    def labels(self):
        """The universal relations: DEPREL before any ':' subtype (obl:tmod -> obl)."""
        return [d.split(":")[0] for d in self.deprels]


def read_conllu(source):
    """Sentences of a CoNLL-U file (a path, .gz or plain, or an iterable of lines). Comment lines, multiword-token
    ranges (3-4) and empty nodes (8.1) are skipped: the words are the lines whose ID is an integer.
    Returns (sentences, skipped) with skipped = {"comment": n, "multiword": n, "empty": n}."""
    if isinstance(source, str):
        opener = gzip.open if source.endswith(".gz") else open
        with opener(source, "rt", encoding="utf-8") as f:
            return read_conllu(f.read().splitlines())
    sentences, skipped, current = [], {"comment": 0, "multiword": 0, "empty": 0}, Sentence()
    for n, line in enumerate(source, 1):
        line = line.rstrip("\n")
        if not line.strip():
            if current.words:
                sentences.append(current)
            current = Sentence()
            continue
        if line.startswith("#"):
            skipped["comment"] += 1
            continue
        cols = line.split("\t")
        if len(cols) != 10:
            raise ValueError(f"CoNLL-U line {n} has {len(cols)} columns, not 10: {line[:60]!r}")
        if "-" in cols[0]:
            skipped["multiword"] += 1
            continue
        if "." in cols[0]:
            skipped["empty"] += 1
            continue
        if int(cols[0]) != len(current.words) + 1:
            raise ValueError(f"CoNLL-U line {n}: word id {cols[0]} out of order")
        current.words.append(cols[1])
        current.upos.append(cols[3])
        current.heads.append(int(cols[6]))
        current.deprels.append(cols[7])
    if current.words:
        sentences.append(current)
    return sentences, skipped


def find_cycle(heads):
    """A cycle of a head array (heads[0] = -1 for ROOT) as a list of node ids, or None."""
    n, state = len(heads), [0] * len(heads)  # 0 unseen, 1 on the current walk, 2 done
    for start in range(1, n):
        walk, v = [], start
        while v > 0 and state[v] == 0:
            state[v] = 1
            walk.append(v)
            v = heads[v]
        if v > 0 and state[v] == 1:  # the walk ran into itself
            return walk[walk.index(v):]
        for u in walk:
            state[u] = 2
    return None


def max_arborescence(scores):
    """Chu-Liu/Edmonds: the highest-scoring tree over nodes 0..n-1 rooted at 0, scores[d, h] for the arc h -> d.
    Every node but 0 gets one head; ROOT may get several children. Returns heads (n,) with heads[0] = -1."""
    s = np.array(scores, dtype=float)
    n = len(s)
    np.fill_diagonal(s, -np.inf)
    s[0, :] = -np.inf  # ROOT has no head
    heads = s.argmax(1)
    heads[0] = -1
    cycle = find_cycle(heads)
    if cycle is None:
        return heads
    # contract the cycle into one node c (the last of the smaller graph) and solve that graph
    rest = [v for v in range(n) if v not in cycle]  # 0 is first: ROOT is never in a cycle
    kept = np.array([s[v, heads[v]] for v in cycle])  # the arcs inside the cycle
    enter = s[np.ix_(cycle, rest)] - kept[:, None]  # h outside -> v in the cycle, v giving up its cycle arc
    leave = s[np.ix_(rest, cycle)]  # h in the cycle -> d outside
    small = np.full((len(rest) + 1, len(rest) + 1), -np.inf)
    small[:-1, :-1] = s[np.ix_(rest, rest)]
    small[-1, :-1] = enter.max(0)
    small[:-1, -1] = leave.max(1)
    sub = max_arborescence(small)
    # expand: arcs between outside nodes stay; an arc from c leaves from the cycle node that scored it best;
    # the arc into c enters the cycle node it was best for, which drops its arc inside the cycle
    out = heads.copy()
    for i, v in enumerate(rest[1:], 1):
        out[v] = cycle[leave[i].argmax()] if sub[i] == len(rest) else rest[sub[i]]
    h = sub[-1]
    out[cycle[enter[:, h].argmax()]] = rest[h]
    return out


def tree_score(scores, heads):
    return float(sum(scores[d][heads[d]] for d in range(1, len(heads))))


def decode_tree(scores):
    """The best well-formed dependency tree for scores (n+1, n+1) over ROOT (0) and n words: every word has one
    head, there are no cycles, and exactly one word hangs from ROOT. Returns the heads of words 1..n (ints 0..n).
    When the unconstrained maximum has several root words, each word is tried as the only one and the best kept."""
    scores = np.asarray(scores, dtype=float)
    heads = max_arborescence(scores)
    if (heads[1:] == 0).sum() == 1:
        return heads[1:].tolist()
    best, best_score = None, -np.inf
    for r in range(1, len(scores)):
        only_r = scores.copy()
        only_r[1:, 0] = -np.inf
        only_r[r, 0] = scores[r, 0]
        candidate = max_arborescence(only_r)
        score = tree_score(scores, candidate)
        if score > best_score:
            best, best_score = candidate, score
    return best[1:].tolist()


def is_tree(heads):
    """True when heads (of words 1..n, 0 = ROOT) form one tree: exactly one root word and no cycle."""
    full = [-1] + list(heads)
    return sum(h == 0 for h in heads) == 1 and find_cycle(full) is None


def attachment_scores(pred_heads, pred_labels, gold_heads, gold_labels):
    """UAS and LAS over all words, punctuation included (the CoNLL 2018 shared task's convention): the share of words
    with the right head, and with the right head and relation. Arguments: one list per sentence, or flat lists."""
    flat = lambda xs: [v for x in xs for v in x] if xs and isinstance(xs[0], (list, tuple)) else list(xs)
    ph, pl, gh, gl = (flat(v) for v in (pred_heads, pred_labels, gold_heads, gold_labels))
    if not len(ph) == len(pl) == len(gh) == len(gl):
        raise ValueError("predictions and gold need one head and one label per word")
    if not gh:
        raise ValueError("no words to score")
    head_ok = [p == g for p, g in zip(ph, gh)]
    both_ok = [h and p == g for h, p, g in zip(head_ok, pl, gl)]
    return {"uas": sum(head_ok) / len(gh), "las": sum(both_ok) / len(gh)}
