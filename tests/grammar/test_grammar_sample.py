"""Constrained decoding end to end: tools/grammar_sample draws outputs with random logits
under the masks of a grammar over the tiny-qwen2 vocabulary (a random "model"), and every
output that ends must validate: 200 generated JSON schemas (seeded, nested, within the
supported subset) with the jsonschema package and its format checker, regexes with
re.fullmatch, choice lists by membership. Unsupported keywords and regex constructs are
refused with an error naming them."""
import json
import os
import random
import re
import subprocess
import tempfile

import jsonschema
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.environ.get("GRAMMAR_SAMPLE") or os.path.join(ROOT, "build", "grammar_sample")
FIXTURES = os.environ.get("ZSE_TEST_DATA") or os.path.join(ROOT, "tests", "fixtures")
TOKENIZER = os.path.join(FIXTURES, "tiny-qwen2")

if not os.path.exists(TOOL):
    pytest.skip(f"grammar_sample is not built at {TOOL}", allow_module_level=True)


def sample(kind, content, n=2, seed=1, extra=()):
    """runs grammar_sample; returns (returncode, outputs, stderr)"""
    suffix = ".json" if kind not in ("--regex", "--schemas") else ".txt"
    with tempfile.NamedTemporaryFile("w", suffix=suffix, delete=False, encoding="utf-8") as f:
        f.write(content)
        path = f.name
    try:
        p = subprocess.run([TOOL, TOKENIZER, kind, path, "-n", str(n), "--seed", str(seed),
                            "--max-tokens", "1500", *extra],
                           capture_output=True, text=True, timeout=120)
    finally:
        os.unlink(path)
    outs = [json.loads(line) for line in p.stdout.splitlines() if line.strip()]
    return p.returncode, outs, p.stderr


# ---- random schemas within the supported subset -------------------------------------------

NAMES = ["id", "name", "value", "a", "b_c", "x-y", "größe", "key with space", "q\"uote", "n1", "items", "type"]
PATTERNS = [r"^[a-z]{2,5}$", r"^\d{3}-\d{4}$", r"^(foo|bar)+$", r"ab", r"^[A-Z][a-z]*$", r"x\.y$",
            r"^[^\s]{1,4}$", r"^\w+@\w+\.com$"]
FORMATS = ["date", "time", "date-time", "uuid", "email", "ipv4", "ipv6", "hostname", "uri"]


class Gen:
    def __init__(self, rng):
        self.r = rng

    def scalar_value(self):
        r = self.r
        return r.choice([r.randint(-50, 50), round(r.uniform(-5, 5), 2), "s" + str(r.randint(0, 9)),
                         True, False, None, "é\"\\"])

    def schema(self, depth):
        r = self.r
        kinds = ["string", "integer", "number", "boolean", "null", "enum", "const"]
        if depth < 3:
            kinds += ["object", "object", "array", "array", "anyOf", "typelist", "allOf"]
        k = r.choice(kinds)
        return getattr(self, "k_" + k.replace("-", "_"))(depth)

    def k_string(self, depth):
        r = self.r
        s = {"type": "string"}
        c = r.randint(0, 4)
        if c == 1:
            lo = r.randint(0, 3)
            s["minLength"] = lo
            if r.random() < 0.7:
                s["maxLength"] = lo + r.randint(0, 6)
        elif c == 2:
            s["pattern"] = r.choice(PATTERNS)
        elif c == 3:
            s["format"] = r.choice(FORMATS)
        return s

    def k_integer(self, depth):
        r = self.r
        s = {"type": "integer"}
        if r.random() < 0.6:
            lo = r.randint(-1000, 1000)
            key = r.choice(["minimum", "exclusiveMinimum"])
            s[key] = lo
            if r.random() < 0.7:
                s[r.choice(["maximum", "exclusiveMaximum"])] = lo + r.randint(2, 5000)
        elif r.random() < 0.5:
            s["maximum"] = r.randint(-100, 100)
        return s

    def k_number(self, depth):
        r = self.r
        s = {"type": "number"}
        if r.random() < 0.5:
            lo = r.randint(-20, 20)
            s["minimum"] = lo
            if r.random() < 0.6:
                s["maximum"] = lo + r.randint(0, 40)
        return s

    def k_boolean(self, depth):
        return {"type": "boolean"}

    def k_null(self, depth):
        return {"type": "null"}

    def k_enum(self, depth):
        vals = []
        for _ in range(self.r.randint(1, 4)):
            v = self.scalar_value()
            if v not in vals:
                vals.append(v)
        if self.r.random() < 0.3:
            vals.append({"k": [1, "two"]})
        return {"enum": vals}

    def k_const(self, depth):
        return {"const": self.scalar_value()}

    def k_object(self, depth):
        r = self.r
        names = r.sample(NAMES, r.randint(0, 4))
        s = {"type": "object", "properties": {n: self.schema(depth + 1) for n in names}}
        s["required"] = [n for n in names if r.random() < 0.6]
        a = r.randint(0, 3)
        if a == 1:
            s["additionalProperties"] = False
        elif a == 2:
            s["additionalProperties"] = True
        elif a == 3:
            s["additionalProperties"] = self.schema(depth + 2)
        if r.random() < 0.2:
            s["title"] = "T"
            s["description"] = "an object"
        return s

    def k_array(self, depth):
        r = self.r
        s = {"type": "array"}
        if r.random() < 0.25:
            s["prefixItems"] = [self.schema(depth + 1) for _ in range(r.randint(1, 2))]
            if r.random() < 0.5:
                s["items"] = False
            else:
                s["items"] = self.schema(depth + 1)
        else:
            s["items"] = self.schema(depth + 1)
        if r.random() < 0.5:
            lo = r.randint(0, 2)
            s["minItems"] = lo
            if r.random() < 0.7:
                s["maxItems"] = lo + r.randint(0, 3)
        elif "items" in s and s["items"] is not False:
            s["maxItems"] = r.randint(0, 4)  # keep random walks short
        if s.get("items") is False and s.get("minItems", 0) > len(s["prefixItems"]):
            s["minItems"] = len(s["prefixItems"])
        return s

    def k_anyOf(self, depth):
        r = self.r
        picks = r.sample(["string", "integer", "boolean", "null", "object", "array"], r.randint(2, 3))
        branches = [getattr(self, "k_" + p)(depth + 1) for p in picks]
        key = "oneOf" if r.random() < 0.3 else "anyOf"  # distinct types: at most one branch matches
        return {key: branches}

    def k_typelist(self, depth):
        types = self.r.sample(["string", "integer", "boolean", "null", "number"], 2)
        if "integer" in types and "number" in types:
            types.remove("integer")
        return {"type": types}

    def k_allOf(self, depth):
        a = {"type": "object", "properties": {"p": self.schema(depth + 1)}, "required": ["p"]}
        b = {"properties": {"q": self.schema(depth + 1)}}
        return {"allOf": [a, b]}


def random_schema(seed):
    rng = random.Random(seed)
    g = Gen(rng)
    if seed % 10 == 0:  # a recursive definition through $ref
        return {"$defs": {"node": {"type": "object",
                                   "properties": {"v": g.schema(2),
                                                  "next": {"anyOf": [{"$ref": "#/$defs/node"}, {"type": "null"}]}},
                                   "required": ["v", "next"], "additionalProperties": False}},
                "$ref": "#/$defs/node"}
    return g.schema(0)


BATCH = 20


@pytest.mark.parametrize("batch", range(200 // BATCH))
def test_random_schemas_validate(batch):
    """20 schemas a run (grammar_sample --schemas: one schema a line), 2 outputs each"""
    seeds = range(batch * BATCH, (batch + 1) * BATCH)
    schemas = [random_schema(seed) for seed in seeds]
    rc, outs, err = sample("--schemas", "\n".join(json.dumps(x) for x in schemas) + "\n", n=2, seed=batch)
    assert rc == 0, err
    errors = [o for o in outs if "error" in o]
    assert not errors, f"refused: {errors[0]}\nschema: {json.dumps(schemas[errors[0]['schema']])}"
    assert {o["schema"] for o in outs} == set(range(BATCH))
    checker = jsonschema.Draft202012Validator.FORMAT_CHECKER
    ended = 0
    for o in outs:
        if not o["ended"]:
            continue
        ended += 1
        schema = schemas[o["schema"]]
        try:
            value = json.loads(o["text"])
        except json.JSONDecodeError as e:
            pytest.fail(f"seed {seeds[o['schema']]}: not JSON ({e}): {o['text']!r}\nschema: {json.dumps(schema)}")
        try:
            jsonschema.Draft202012Validator(schema, format_checker=checker).validate(value)
        except jsonschema.ValidationError as e:
            pytest.fail(f"seed {seeds[o['schema']]}: {e.message}\noutput: {o['text']!r}\nschema: {json.dumps(schema)}")
    assert ended >= BATCH, f"only {ended} of {2 * BATCH} outputs ended within the token limit"


def test_strict_schema():
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                               "days": {"type": "integer", "minimum": 1, "maximum": 14}},
              "required": ["city", "days"], "additionalProperties": False}
    rc, outs, err = sample("--schema", json.dumps(schema), n=5, extra=("--strict",))
    assert rc == 0, err
    for o in outs:
        assert o["ended"]
        jsonschema.validate(json.loads(o["text"]), schema)
    lax = dict(schema, required=["city"])
    rc, _, err = sample("--schema", json.dumps(lax), extra=("--strict",))
    assert rc == 2 and "strict" in err and "'days'" in err


def test_json_object():
    p = subprocess.run([TOOL, TOKENIZER, "--json-object", "-n", "6", "--seed", "5", "--max-tokens", "1500"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    outs = [json.loads(line) for line in p.stdout.splitlines()]
    assert sum(o["ended"] for o in outs) >= 3
    for o in outs:
        if o["ended"]:
            assert isinstance(json.loads(o["text"]), dict)


UNSUPPORTED = [
    ({"type": "object", "properties": {"a": {"not": {"type": "null"}}}}, "'not'", "#/properties/a/not"),
    ({"type": "array", "uniqueItems": True}, "'uniqueItems'", "#/uniqueItems"),
    ({"type": "integer", "multipleOf": 5}, "'multipleOf'", "#/multipleOf"),
    ({"type": "object", "patternProperties": {"^a": {}}}, "'patternProperties'", "#/patternProperties"),
    ({"if": {"type": "string"}, "then": {"minLength": 1}}, "'if'", "#/if"),
    ({"type": "string", "format": "duration"}, "format 'duration'", "#/format"),
    ({"$ref": "other.json#/a"}, "$ref", "#"),
    ({"type": "string", "pattern": "(?<=a)b"}, "lookbehind", "#/pattern"),
    ({"type": "number", "exclusiveMinimum": 0.5}, "exclusiveMinimum", "#/exclusiveMinimum"),
    ({"type": "object", "properties": {"l": {"type": "array", "contains": {"type": "string"}}}}, "'contains'",
     "#/properties/l/contains"),
]


@pytest.mark.parametrize("schema,keyword,path", UNSUPPORTED)
def test_unsupported_refused(schema, keyword, path):
    rc, outs, err = sample("--schema", json.dumps(schema))
    assert rc == 2 and not outs, err
    assert keyword in err and path in err, err


REGEXES = [r"[a-c]{2,4}x?", r"(true|false|maybe)", r"\d{3}-\d{2}-\d{4}", r"[A-Z][a-z]+( [A-Z][a-z]+)*",
           r"0x[0-9a-fA-F]{1,8}", r"(ab|cd)*e", r"[^a-z]{1,5}", r"\w+\s\w+", r"https?://[a-z]+\.(com|org)/?",
           r"-?(0|[1-9]\d*)(\.\d+)?", r"[\u00e9\u00fc]{2}z", r".{3}", r"(a|b)+?c", r"\(\)\[\]\{\}\.\*\\"]


@pytest.mark.parametrize("pattern", REGEXES)
def test_regex_outputs_fullmatch(pattern):
    rc, outs, err = sample("--regex", pattern, n=4, seed=len(pattern))
    assert rc == 0, err
    assert sum(o["ended"] for o in outs) >= 2
    for o in outs:
        if o["ended"]:
            assert re.fullmatch(pattern, o["text"]), (pattern, o["text"])


@pytest.mark.parametrize("pattern", [r"a\1", r"(?=x)y", r"\bword", r"a{2,1}", r"(a", r"(x*)+", r"a++"])
def test_regex_unsupported_refused(pattern):
    rc, outs, err = sample("--regex", pattern)
    assert rc == 2 and "regex" in err, err


def test_choice():
    choices = ["yes", "no", "maybe so", "n/a", "日本"]
    rc, outs, err = sample("--choice", json.dumps(choices), n=12, seed=3)
    assert rc == 0, err
    assert all(o["ended"] and o["text"] in choices for o in outs), outs
    assert len({o["text"] for o in outs}) >= 3
