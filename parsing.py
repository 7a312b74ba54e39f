"""
Dependency parsing on Universal Dependencies English EWT (`python train.py --task ud_ewt --data-dir DIR`): the
files, reading CoNLL-U, vocabularies and batches, the biaffine output layer and loss that model.py uses with
output="biaffine", decoding scores to a well-formed tree, and the attachment scores.

    sentences, skipped = read_conllu("samples/en_ewt-ud-dev-sample.conllu")
    pred_heads = decode_tree(scores)            # scores (n+1, n+1): scores[d, h] for word d under head h, 0 = ROOT
    print(attachment_scores(pred_heads, pred_labels, gold_heads, gold_labels))   # {"uas": ..., "las": ...}

Data: UD English EWT v2.15 (CC BY-SA 4.0), the files named in UD_FILES with the sentence counts in UD_COUNTS. A
small sample of the dev file for the tests is in samples/; the full treebank is never committed.

Tests: python -m pytest -q test_all.py -k "conllu or tree or attachment or pars or padding or treebank"
"""

import gzip
import os
import shutil
import urllib.request
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from stats import item_means

UD_FILES = {"train": "en_ewt-ud-train.conllu.gz", "dev": "en_ewt-ud-dev.conllu.gz", "test": "en_ewt-ud-test.conllu.gz"}
UD_COUNTS = {"train": 12544, "dev": 2001, "test": 2077}  # sentences in each file of release 2.15
UD_URL = "https://raw.githubusercontent.com/UniversalDependencies/UD_English-EWT/r2.15/{name}"  # the release tag
PAD, UNK, ROOT = 0, 1, 2  # word and tag ids shared by every vocabulary: padding, unknown, the ROOT token
MIN_COUNT = 2  # a training word seen fewer times is unknown (so the model learns what to do with unknown words)


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
        if not (cols[0].isdigit() and cols[6].isdigit()):
            raise ValueError(f"CoNLL-U line {n}: ID {cols[0]!r} or HEAD {cols[6]!r} is not a number")
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
    """The summed scores of a tree; heads: the full array, heads[0] (ROOT) ignored, as max_arborescence's."""
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
    with the right head, and with the right head and relation (the task's labels: universal relations, subtypes
    dropped). Arguments: one list per sentence, or flat lists."""
    flat = lambda xs: [v for x in xs for v in x] if xs and isinstance(xs[0], (list, tuple)) else list(xs)
    ph, pl, gh, gl = (flat(v) for v in (pred_heads, pred_labels, gold_heads, gold_labels))
    if not len(ph) == len(pl) == len(gh) == len(gl):
        raise ValueError("predictions and gold need one head and one label per word")
    if not gh:
        raise ValueError("no words to score")
    head_ok = [p == g for p, g in zip(ph, gh)]
    both_ok = [h and p == g for h, p, g in zip(head_ok, pl, gl)]
    return {"uas": sum(head_ok) / len(gh), "las": sum(both_ok) / len(gh)}


# Files: the three of the release, found in a folder or downloaded into it.

def ud_files(data_dir, progress=True):
    """Paths of the train, dev and test files in data_dir (.conllu or .conllu.gz); missing ones are downloaded from
    the treebank's repository (release r2.15) with a progress bar and checked against the release's sentence
    counts. A failed download raises ValueError with one line that says where to put the files by hand."""
    os.makedirs(data_dir, exist_ok=True)
    paths = {}
    for split, gz_name in UD_FILES.items():
        plain = os.path.join(data_dir, gz_name[:-3])
        have = [p for p in (os.path.join(data_dir, gz_name), plain) if os.path.isfile(p)]
        if have:
            paths[split] = have[0]
            continue
        url = UD_URL.format(name=gz_name[:-3])
        try:
            with urllib.request.urlopen(url, timeout=30) as r, open(plain + ".part", "wb") as f:
                size = int(r.headers.get("Content-Length") or 0) or None
                with tqdm(total=size, unit="B", unit_scale=True, desc=gz_name[:-3], disable=not progress) as bar:
                    for chunk in iter(lambda: r.read(1 << 16), b""):
                        f.write(chunk)
                        bar.update(len(chunk))
            count = len(read_conllu(plain + ".part")[0])
            if count != UD_COUNTS[split]:
                raise ValueError(f"{count} sentences, release 2.15 has {UD_COUNTS[split]}")
            shutil.move(plain + ".part", plain)
        except Exception as exc:  # no network, a moved file, a truncated download
            if os.path.exists(plain + ".part"):
                os.remove(plain + ".part")
            raise ValueError(f"could not download {url} ({type(exc).__name__}: {exc}); put the UD English EWT v2.15 "
                             f"files {', '.join(UD_FILES.values())} (or the same without .gz) into {data_dir} by "
                             f"hand") from None
        paths[split] = plain
    return paths


# Batches: one sentence per row, ROOT at position 0, padding at the end.

def build_vocab(items, min_count=1):
    """{item: id} for the items seen at least min_count times, after the PAD, UNK and ROOT ids."""
    counts = Counter(items)
    vocab = {"<pad>": PAD, "<unk>": UNK, "<root>": ROOT}
    for item in sorted(counts, key=lambda w: (-counts[w], w)):
        if counts[item] >= min_count:
            vocab[item] = len(vocab)
    return vocab


SUFFIX = 3  # an unknown or rare word still shows its last letters (its suffix vocabulary has MIN_COUNT too)


def shape(word):
    """A word's spelling class: what lowercasing drops (its case), and whether it has digits or no letters."""
    if any(c.isdigit() for c in word):
        return "digit"
    if not any(c.isalpha() for c in word):
        return "symbol"
    if word.isupper() and len(word) > 1:
        return "upper"
    return "title" if word[0].isupper() else "lower"


# How a sentence is read, one id column each: the word (lowercased), its suffix, its shape, and its gold UPOS tag
# (used with --upos gold). The vocabularies are built from the training sentences with the same readers.
COLUMNS = (lambda s: [w.lower() for w in s.words], lambda s: [w.lower()[-SUFFIX:] for w in s.words],
           lambda s: [shape(w) for w in s.words], lambda s: s.upos)


def encode_sentences(sentences, vocabs, labels):
    """x (B, n+1, C): per token, C ids, one per vocabulary in vocabs (word, suffix, shape, and the gold UPOS tag
    if it is given); y (B, n+1, 2): gold heads and label ids. Position 0 is ROOT; rows are padded to the longest
    sentence with PAD in x and -100 (ignored) in y."""
    n = max(len(s.words) for s in sentences) + 1
    x = torch.full((len(sentences), n, len(vocabs)), PAD, dtype=torch.long)
    y = torch.full((len(sentences), n, 2), -100, dtype=torch.long)
    for i, s in enumerate(sentences):
        x[i, 0] = ROOT
        for c, (vocab, read) in enumerate(zip(vocabs, COLUMNS)):
            x[i, 1:len(s.words) + 1, c] = torch.tensor([vocab.get(v, UNK) for v in read(s)])
        y[i, 1:len(s.words) + 1, 0] = torch.tensor(s.heads)
        y[i, 1:len(s.words) + 1, 1] = torch.tensor([labels.get(lab, UNK) for lab in s.labels()])
    return x, y


def read_split(path):
    """A treebank file's sentences; a damaged or unreadable file (already in the folder, so never checked as a
    download is) raises ValueError with one line naming it."""
    try:
        return read_conllu(path)[0]
    except (OSError, EOFError, UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"{path}: {exc}; delete it to download it again, or put a good copy there") from None


class ParseTask:
    """UD English EWT dependency parsing: a sentence is a row of word tokens after ROOT; the label per word is its
    head (a position, 0 = ROOT) and its universal relation. Training batches hold sentences of similar length
    (consecutive in length order) and are padded only to their own longest sentence."""

    def __init__(self, name, data_dir, *, upos=False, word_dropout=0.0, n_val=None, n_test=None, progress=True):
        paths = ud_files(data_dir, progress)
        self.sentences = {split: read_split(path) for split, path in paths.items()}
        train = self.sentences["train"]
        self.words, self.suffixes, self.shapes, self.tags = (
            build_vocab([v for s in train for v in read(s)], min_count)
            for read, min_count in zip(COLUMNS, (MIN_COUNT, MIN_COUNT, 1, 1)))
        self.labels = build_vocab([lab for s in train for lab in s.labels()])
        # the input columns: the word, its suffix and shape (words only), and the gold UPOS tag with upos=True
        self.vocabs = [self.words, self.suffixes, self.shapes] + ([self.tags] if upos else [])
        self.name, self.upos, self.grid = name, upos, None  # grid None: a sequence, (1, N) for each batch's N
        self.word_dropout = word_dropout  # training words read as UNK with this probability, so UNK is learned
        self.vocab_size, self.n_classes = len(self.words), len(self.labels)
        self.feature_vocab = tuple(len(v) for v in self.vocabs[1:])  # the model embeds each column and sums
        self.by_length = sorted(range(len(train)), key=lambda i: len(train[i].words))
        held = {"val": self.sentences["dev"][:n_val], "test": self.sentences["test"][:n_test]}
        # held-out sets in length order, so evaluation batches are short and evenly padded
        self.splits = {s: self.encode(sorted(v, key=lambda z: len(z.words))) for s, v in held.items()}

    def encode(self, sentences):
        return encode_sentences(sentences, self.vocabs, self.labels)

    def train_batch(self, batch_size, gen, **curriculum):
        """batch_size training sentences of similar length: a run of the length-sorted order at a random place
        (uniform over start places, so the few shortest and longest sentences are drawn less often)."""
        start = int(torch.randint(max(1, len(self.by_length) - batch_size + 1), (1,), generator=gen))
        rows = self.by_length[start:start + batch_size]
        x, y = self.encode([self.sentences["train"][i] for i in rows])
        if self.word_dropout > 0:
            drop = torch.rand(x.shape[:2], generator=gen) < self.word_dropout
            x[..., 0][drop & (y[..., 0] != -100)] = UNK  # real words only, never ROOT or padding; suffix, shape kept
        return x, y

    def split(self, name):
        if name not in self.splits:
            raise ValueError(f"unknown split {name!r}; use 'val' or 'test'")
        return self.splits[name]

    def metrics(self, logits, x, y, per_item=False):
        """uas and las of the decoded trees (Chu-Liu/Edmonds), over all words; not_tree: the share of sentences
        whose greedy (argmax) heads did not form a tree. per_item=True: a list per metric, one value per sentence,
        and "words", each sentence's word count (stats.item_means weights uas and las by it)."""
        arc, lab = (t.detach().float().cpu() for t in logits)
        y = y.cpu()
        items = {"uas": [], "las": [], "not_tree": [], "words": []}
        for b in range(len(arc)):
            n = int((y[b, :, 0] != -100).sum())
            scores = arc[b, :n + 1, :n + 1].numpy()
            greedy = scores[1:].argmax(1).tolist()
            heads = decode_tree(scores)
            labels = lab[b, torch.arange(1, n + 1), torch.tensor(heads)].argmax(-1).tolist()
            got = attachment_scores(heads, labels, y[b, 1:n + 1, 0].tolist(), y[b, 1:n + 1, 1].tolist())
            items["uas"].append(got["uas"])
            items["las"].append(got["las"])
            items["not_tree"].append(float(not is_tree(greedy)))
            items["words"].append(n)
        return items if per_item else item_means(items)  # uas and las over all words, not_tree over sentences

    def trim(self, x, y):
        """A batch of the held-out sets cut to its longest sentence (the sets are padded to their longest)."""
        n = int((y[..., 0] != -100).sum(1).max()) + 1
        return x[:, :n], y[:, :n]


# The parser's output layer and loss (used by model.py when output="biaffine").

class Biaffine(nn.Module):
    """Biaffine scoring (Dozat & Manning 2017) from the encoder's token states h (B, N, D):
    arc[b, d, j] = a_dep[d] . U a_head[j] + a_head[j] . u, the score of token j as the head of token d, and
    lab[b, d, j, :] = bilinear label scores of the arc j -> d (with bias terms), for every pair."""

    def __init__(self, d_model, n_labels, d_arc=128, d_label=64):
        super().__init__()
        self.arc_dep, self.arc_head = (nn.Sequential(nn.Linear(d_model, d_arc), nn.GELU()) for _ in range(2))
        self.lab_dep, self.lab_head = (nn.Sequential(nn.Linear(d_model, d_label), nn.GELU()) for _ in range(2))
        self.U = nn.Parameter(torch.zeros(d_arc, d_arc))
        self.u = nn.Parameter(torch.zeros(d_arc))
        self.W = nn.Parameter(torch.zeros(n_labels, d_label + 1, d_label + 1))  # the +1: bias rows and columns

    def forward(self, h, pad):
        """h (B, N, D), pad (B, N) bool -> arc (B, N, N) with padding heads at -inf, lab (B, N, N, L)."""
        a_dep, a_head = self.arc_dep(h), self.arc_head(h)  # (B, N, d_arc)
        arc = a_dep @ self.U @ a_head.transpose(1, 2) + (a_head @ self.u)[:, None, :]  # (B, N dependents, N heads)
        arc = arc.masked_fill(pad[:, None, :], float("-inf"))
        one = torch.ones_like(h[..., :1])
        l_dep, l_head = torch.cat([self.lab_dep(h), one], -1), torch.cat([self.lab_head(h), one], -1)  # (B, N, dl+1)
        lab = torch.einsum("bdi,lij->bdlj", l_dep, self.W) @ l_head.transpose(1, 2)[:, None]  # (B, N, L, N)
        return arc, lab.transpose(2, 3)  # lab (B, N dependents, N heads, L)


def parse_loss(logits, y):
    """Per-sentence mean over its words of the cross-entropy of the gold head among all tokens plus that of the gold
    relation on the gold arc: logits (arc, lab), y (B, N, 2) -> (B,)."""
    arc, lab = logits
    heads, labels = y[..., 0], y[..., 1]
    words = heads != -100  # (B, N): real words (not ROOT, not padding)
    safe = heads.clamp_min(0)
    head_ce = F.cross_entropy(arc.float().transpose(1, 2), safe, reduction="none")  # (B, N)
    gold_arc = lab.gather(2, safe[:, :, None, None].expand(-1, -1, 1, lab.shape[-1])).squeeze(2)  # (B, N, L)
    label_ce = F.cross_entropy(gold_arc.float().transpose(1, 2), labels.clamp_min(0), reduction="none")  # (B, N)
    w = words.float()
    return ((head_ce + label_ce) * w).sum(1) / w.sum(1).clamp_min(1.0)
