"""The protected-sender registry (rules/senders/*.toml) and look-alike domain detection.

Look-alikes of a protected domain: the same name under another TLD (ameli.com), a name a typo
away (arneli.fr, amelli.fr: Damerau-Levenshtein distance, jellyfish), the name combined with
words (ameli-remboursement.com), the real domain as a subdomain of another one
(ameli.fr.secure-login.com), and Unicode homographs or punycode (аmeli.fr with a Cyrillic a:
skeleton through confusable-homoglyphs' Unicode confusables data, UTS #39).
"""

from __future__ import annotations

import contextlib
import itertools
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import jellyfish
from confusable_homoglyphs import confusables

from gateway.auth.dmarc import org_domain
from gateway.config import read_toml
from gateway.errors import ConfigError


@dataclass(frozen=True, slots=True, kw_only=True)
class Organisation:
    id: str
    name: str  # French, as in "venant de {org}"
    domains: tuple[str, ...]
    subdomains: bool = True
    names: tuple[str, ...] = ()
    authenticate: bool = True
    generic_label: bool = False  # its domain name is a common word: no look-alike by name


@dataclass(frozen=True, slots=True, kw_only=True)
class Lookalike:
    org: Organisation
    kind: str  # tld-swap, typo, combo, subdomain, homograph
    imitated: str  # the protected domain it imitates


def fold(text: str) -> str:
    """Lower case, no accents, words separated by single spaces."""
    decomposed = unicodedata.normalize("NFKD", text.casefold())
    plain = "".join(c for c in decomposed if not unicodedata.combining(c))
    return " ".join(re.sub(r"[^0-9a-z]+", " ", plain).split())


def any_word(words: list[str]) -> re.Pattern[str]:
    """A pattern finding any of these words (or word sequences, or patterns) as whole words
    of a folded text."""
    return re.compile(r"\b(?:" + "|".join(words) + r")\b")


_KEYS = {"id", "name", "domains", "subdomains", "names", "authenticate", "generic_label"}


def load_registry(folder: Path) -> list[Organisation]:
    orgs: list[Organisation] = []
    seen: set[str] = set()
    for path in sorted(folder.glob("*.toml")):
        data = read_toml(path)
        for i, spec in enumerate(data.get("organisation", [])):
            where = f"{path}: organisation[{i}]"
            unknown = set(spec) - _KEYS
            if unknown:
                raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
            if not spec.get("id") or not spec.get("name") or not spec.get("domains"):
                raise ConfigError(f"{where}: id, name and domains are required")
            if spec["id"] in seen:
                raise ConfigError(f"{where}: id {spec['id']!r} is already used")
            seen.add(spec["id"])
            orgs.append(Organisation(
                id=spec["id"], name=spec["name"],
                domains=tuple(d.lower().rstrip(".") for d in spec["domains"]),
                subdomains=bool(spec.get("subdomains", True)),
                names=tuple(spec.get("names", ())),
                authenticate=bool(spec.get("authenticate", True)),
                generic_label=bool(spec.get("generic_label", False))))
    return orgs


class Registry:
    def __init__(self, orgs: list[Organisation], *, loose_names: bool = False,
                 min_label: int = 4, tld_swap: bool = True) -> None:
        """`loose_names`: names are also found written with look-alike letters, spaces or
        punctuation inside (Micrοsοft with Greek omicrons, M.i.c.r.o.s.o.f.t, LaPoste), for
        names of 6 letters or more. `min_label`: shorter domain names get no look-alike by
        name (a typo away from a 4-letter name is another word). `tld_swap`: the same name
        under another TLD is a look-alike (not for brands, whose country domains abound)."""
        self.orgs = orgs
        self._names = sorted(((f" {fold(n)} ", o) for o in orgs for n in o.names if fold(n)),
                             key=lambda x: -len(x[0]))
        self._compact = sorted(((c, o) for o in orgs for n in o.names
                                if len(c := fold(n).replace(" ", "")) >= 6),
                               key=lambda x: -len(x[0])) if loose_names else []
        self._min_label = min_label
        self._tld_swap = tld_swap
        self._owners: dict[str, Organisation] = {}
        for org in orgs:
            for own in org.domains:
                self._owners.setdefault(own, org)
        # (organisation, its domain, the name to compare with, its suffix), computed once.
        self._targets: list[tuple[Organisation, str, str, str]] = []
        for org in orgs:
            for own in org.domains:
                registrable = org_domain(own)
                own_label, _, own_suffix = registrable.partition(".")
                if own.count(".") > registrable.count("."):
                    own_label = own.split(".")[0]  # ars.sante.fr: the name is "ars"
                self._targets.append((org, own, own_label, own_suffix))
        self._seen: dict[str, Lookalike | None] = {}

    def owner(self, domain: str) -> Organisation | None:
        """The organisation the domain belongs to (itself or, where allowed, a subdomain):
        its suffixes looked up, longest first (the first organisation listing a domain
        keeps it)."""
        labels = domain.lower().rstrip(".").split(".")
        for i in range(len(labels)):
            org = self._owners.get(".".join(labels[i:]))
            if org is not None and (i == 0 or org.subdomains):
                return org
        return None

    def named_in(self, text: str) -> Organisation | None:
        """The organisation whose name appears in the text, as whole words. With
        `loose_names` (brands): not after "de", "du", "des" ("Pharmacie de la Poste",
        "Centre hospitalier d'Orange" name a street or a town), and also found once
        look-alike letters, spaces and punctuation are gone (M.i.c.r.o.s.o.f.t, Microsoft365),
        from a word's start to a word's end (not "Dr Amazonas")."""
        folded = f" {fold(text)} "
        for name, org in self._names:
            at = folded.find(name)
            while at >= 0:
                if not self._compact or not folded[:at + 1].endswith(_PLACE_WORDS):
                    return org
                at = folded.find(name, at + 1)
        if self._compact:
            # Addresses dropped first: jean.dupont@laposte.net names no brand.
            words = fold(_skeleton(_ADDRESSES.sub(" ", text[:500]))).split()
            compact = "".join(words)
            # Where each word starts in `compact`, and which word that is.
            starts = {at: i for i, at in enumerate(
                itertools.accumulate([0] + [len(w) for w in words[:-1]]))}
            for name, org in self._compact:
                at = compact.find(name)
                while at >= 0:
                    end = at + len(name)
                    word = starts.get(at)
                    if word is not None and (end in starts or end == len(compact)
                                             or compact[end].isdigit()) and \
                            (word == 0 or f" {words[word - 1]} " not in _PLACE_WORDS):
                        return org
                    at = compact.find(name, at + 1)
        return None

    def lookalike(self, domain: str) -> Lookalike | None:
        d = domain.lower().rstrip(".")
        if d not in self._seen:
            if len(self._seen) > 50_000:
                self._seen.clear()
            self._seen[d] = self._lookalike(d)
        return self._seen[d]

    def _lookalike(self, d: str) -> Lookalike | None:
        if not d or "." not in d or self.owner(d) is not None:
            return None
        unicode_d = _to_unicode(d)
        skeleton = _skeleton(unicode_d)
        registrable = org_domain(skeleton)
        label, _, suffix = registrable.partition(".")
        tokens = set(re.split(r"[-_.0-9]+", label))
        visual = _visual(label)
        visual_tokens = set(re.split(r"[-_.]+", visual))  # micros0ft-billing: microsoft
        for org, own, own_label, own_suffix in self._targets:
            if skeleton != unicode_d and (skeleton == own or skeleton.endswith("." + own)):
                return Lookalike(org=org, kind="homograph", imitated=own)
            if f".{own}." in f".{skeleton}" and not skeleton.endswith(own):
                return Lookalike(org=org, kind="subdomain", imitated=own)
            if len(own_label) < self._min_label or org.generic_label:
                continue
            if label == own_label and suffix != own_suffix and self._tld_swap:
                return Lookalike(org=org, kind="tld-swap", imitated=own)
            if label != own_label and (own_label in tokens
                                       or _visual(own_label) in visual_tokens):
                return Lookalike(org=org, kind="combo", imitated=own)
            if label != own_label and visual == _visual(own_label):
                return Lookalike(org=org, kind="typo", imitated=own)
            # A letter changed, added or swapped (not dropped: short words are often
            # another word minus a letter).
            limit = 1 if len(own_label) < 9 else 2
            if label != own_label and len(label) >= len(own_label) and \
                    jellyfish.damerau_levenshtein_distance(label, own_label) <= limit:
                return Lookalike(org=org, kind="typo", imitated=own)
        return None


_ADDRESSES = re.compile(r"\S+@\S+")
_PLACE_WORDS = (" de ", " du ", " des ", " d ")
_VISUAL = (("rn", "m"), ("vv", "w"), ("cl", "d"), ("0", "o"), ("1", "l"), ("i", "l"))


def _visual(label: str) -> str:
    """ASCII letters that read alike at a glance (arneli / ameli, doctoiib / doctolib)."""
    for a, b in _VISUAL:
        label = label.replace(a, b)
    return label


def _to_unicode(domain: str) -> str:
    labels = []
    for label in domain.split("."):
        if label.startswith("xn--"):
            with contextlib.suppress(UnicodeError):
                label = label.encode("ascii").decode("idna")
        labels.append(label)
    return ".".join(labels)


def _skeleton(text: str) -> str:
    """Confusable characters replaced by the Latin letters they imitate."""
    if text.isascii():
        return text
    found = confusables.is_confusable(text, greedy=True, preferred_aliases=["latin"]) or []
    table = {f["character"]: f["homoglyphs"][0]["c"] for f in found if f.get("homoglyphs")}
    out = "".join(table.get(c, c) for c in text)
    return unicodedata.normalize("NFKD", out).encode("ascii", "ignore").decode().lower()
