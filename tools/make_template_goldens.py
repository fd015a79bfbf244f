#!/usr/bin/env python3
"""Regenerates tests/fixtures/templates/goldens.json: what Python jinja2 renders, set up as
transformers' apply_chat_template sets it up (ImmutableSandboxedEnvironment, trim_blocks,
lstrip_blocks, loopcontrols, a `generation` tag rendering its body, tojson as json.dumps,
raise_exception, strftime_now fixed to 2024-07-26 09:30:00).

Cases are inline sources (one construct each) and the real templates copied into
tests/fixtures/templates/*.jinja rendered with a few chat contexts.
Run: python3 tools/make_template_goldens.py   (needs jinja2)"""
import datetime
import json
import os
import sys

import jinja2
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

HERE = os.path.dirname(os.path.abspath(__file__))
DIR = os.path.join(HERE, "..", "tests", "fixtures", "templates")


class Generation(Extension):
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render", []), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def make_env():
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def strftime_now(fmt):
        return datetime.datetime(2024, 7, 26, 9, 30, 0).strftime(fmt)

    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


MSGS = [{"role": "user", "content": "Hi"}]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Get the weather",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]

# (case name, source, context)
INLINE = [
    # whitespace control, trim_blocks, lstrip_blocks, comments, raw
    ("trim_blocks", "{% if true %}\nyes\n{% endif %}\nend", {}),
    ("lstrip_blocks", "a\n    {% if true %}\n    b\n    {% endif %}\nc", {}),
    ("lstrip_plus", "a\n    {%+ if true %}b{% endif %}", {}),
    ("keep_newline_plus", "{% if true +%}\nb{% endif %}", {}),
    ("dash_strip", "a   {%- if true -%}   b   {%- endif -%}   c", {}),
    ("var_dash", "x  {{- 1 -}}  y {{ 2 }}\n", {}),
    ("comment", "a\n  {# note #}\nb{#- x -#}   c", {}),
    ("raw", "{% raw %}{{ not }}{% if %}{% endraw %}!", {}),
    ("trailing_newline", "line\n", {}),
    ("crlf", "a\r\n{% if true %}\r\nb\r\n{% endif %}\r\n", {}),
    ("var_no_trim", "{{ 1 }}\n{{ 2 }}\n", {}),
    ("text_then_tag_same_line", "ab {% if true %}x{% endif %} cd", {}),
    # literals and printing
    ("literals", "{{ 1 }} {{ -2 }} {{ 1.5 }} {{ 1e-5 }} {{ 1e16 }} {{ 3.0 }} {{ 0.1 + 0.2 }} {{ 1_000 }}", {}),
    ("print_values", "{{ none }}|{{ true }}|{{ False }}|{{ [1, 'a', none, true, 2.5] }}|{{ (1,) }}|{{ (1, 2) }}|{{ {'a': [1, {'b': none}]} }}", {}),
    ("string_escapes", "{{ 'a\\nb\\tc\\'d\\\\e' }}|{{ \"\\u00e9\\x41\" }}|{{ 'x' 'y' }}|{{ ['it\\'s', \"q\\\"\"] }}", {}),
    ("string_repr_unicode", "{{ ['é', 'a\\nb', '\\x01'] }}", {}),
    ("undefined_print", "[{{ nothing }}][{{ d.missing }}]", {"d": {}}),
    # operators
    ("arith", "{{ 7 // 2 }} {{ -7 // 2 }} {{ 7 % 3 }} {{ -7 % 3 }} {{ 7 / 2 }} {{ 2 ** 10 }} {{ 2 ** -1 }} {{ 7.5 // 2 }} {{ 1 + 2 * 3 - 4 }}", {}),
    ("concat", "{{ 'a' ~ 1 ~ none ~ true ~ [1] }}", {}),
    ("str_plus", "{{ 'a' + 'b' }}{{ [1] + [2] }}{{ 'ab' * 3 }}", {}),
    ("compare", "{{ 1 < 2 }} {{ 2 <= 2 }} {{ 'a' < 'b' }} {{ 1 == 1.0 }} {{ true == 1 }} {{ [1,2] == [1,2] }} {{ 1 < 2 < 3 }} {{ 3 > 2 > 5 }}", {}),
    ("in_notin", "{{ 'a' in 'cat' }} {{ 2 in [1,2] }} {{ 'k' in {'k': 1} }} {{ 3 not in [1] }} {{ 'z' not in 'abc' }}", {}),
    ("logic", "{{ true and 'x' }} {{ false or 'y' }} {{ not none }} {{ 0 or [] or 'z' }} {{ not 1 == 2 }}", {}),
    ("ternary", "{{ 'y' if true else 'n' }}{{ 'y' if false else 'n' }}[{{ 'y' if false }}]", {}),
    ("unary", "{{ -(3) }} {{ +4 }} {{ -x }} {{ - 2 ** 2 }}", {"x": 1.5}),
    ("slicing", "{{ 'abcdef'[1:3] }} {{ 'abcdef'[::-1] }} {{ 'abcdef'[::2] }} {{ [1,2,3,4][-2:] }} {{ [1,2,3,4][:-1] }} {{ 'héllo'[1:3] }} {{ [1,2,3][5:] }} {{ 'abc'[-1] }}", {}),
    ("attr_item", "{{ d.a }} {{ d['a'] }} {{ l[0].b }} {{ l.0.b }} {{ d.get('zz', 'dflt') }}", {"d": {"a": 1}, "l": [{"b": 2}]}),
    ("dict_method_vs_key", "{{ d['items'] }}|{{ d.items() | list }}", {"d": {"items": "key", "x": 1}}),
    # statements
    ("if_elif_else", "{% for x in [1, 2, 3] %}{% if x == 1 %}one{% elif x == 2 %}two{% else %}many{% endif %};{% endfor %}", {}),
    ("for_loop_vars", "{% for x in 'abc' %}{{ loop.index }}{{ loop.index0 }}{{ loop.revindex }}{{ loop.revindex0 }}{{ loop.first }}{{ loop.last }}{{ loop.length }}{{ loop.previtem }}{{ loop.nextitem }}{{ loop.cycle('o', 'e') }}|{% endfor %}", {}),
    ("for_else", "{% for x in [] %}x{% else %}empty{% endfor %}{% for x in none_list %}x{% else %}undef-empty{% endfor %}", {}),
    ("for_unpack", "{% for k, v in d.items() %}{{ k }}={{ v }};{% endfor %}{% for a, b in [(1, 2), [3, 4]] %}{{ a + b }}{% endfor %}", {"d": {"x": 1, "y": [2]}}),
    ("for_filter", "{% for x in range(10) if x is odd %}{{ x }}{{ '/' ~ loop.length if loop.last }}{% endfor %}", {}),
    ("for_dict", "{% for k in d %}{{ k }}{% endfor %}", {"d": {"b": 1, "a": 2}}),
    ("break_continue", "{% for x in range(10) %}{% if x == 2 %}{% continue %}{% endif %}{% if x == 5 %}{% break %}{% endif %}{{ x }}{% endfor %}", {}),
    ("nested_loops", "{% for a in [1, 2] %}{% for b in 'xy' %}{{ loop.index }}{{ b }}{% endfor %}{{ loop.index }}|{% endfor %}", {}),
    ("set_scope", "{% set c = 0 %}{% for i in [1, 2, 3] %}{% set c = c + i %}{{ c }}{% endfor %}={{ c }}{% if true %}{% set d = 5 %}{% endif %}{{ d }}", {}),
    ("namespace", "{% set ns = namespace(n=0, s='') %}{% for i in range(4) %}{% set ns.n = ns.n + i %}{% set ns.s = ns.s ~ i %}{% endfor %}{{ ns.n }} {{ ns.s }}", {}),
    ("set_tuple", "{% set a, b = 1, 2 %}{{ a }}{{ b }}", {}),
    ("set_block", "{% set x %}\n  hello {{ 1 + 1 }}\n{% endset %}[{{ x }}]{% set y | upper | trim %} abc {% endset %}[{{ y }}]", {}),
    ("macro", "{% macro greet(name, punct='!') %}Hi {{ name }}{{ punct }}{% endmacro %}{{ greet('a') }} {{ greet('b', '?') }} {{ greet(name='c', punct='.') }}", {}),
    ("macro_varargs", "{% macro m(a) %}{{ a }}{{ varargs }}{{ kwargs }}{% endmacro %}{{ m(1, 2, 3, k=4) }}", {}),
    ("macro_sees_top_level", "{% set x = 1 %}{% macro m() %}{{ x }}{% endmacro %}{% set x = 2 %}{{ m() }}", {}),
    ("macro_recursive", "{% macro f(n) %}{% if n > 0 %}{{ n }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(4) }}", {}),
    ("call_block", "{% macro wrap(t) %}<{{ t }}>{{ caller() }}</{{ t }}>{% endmacro %}{% call wrap('b') %}inside{% endcall %}", {}),
    ("filter_block", "{% filter upper %}abc {{ 'd' }}{% endfilter %}", {}),
    ("generation", "{% generation %}gen {{ 1 }}{% endgeneration %}!", {}),
    ("with_block", "{% with a = 1, b = 2 %}{{ a + b }}{% endwith %}[{{ a }}]", {}),
    # filters
    ("tojson", "{{ d | tojson }}\n{{ d | tojson(indent=2) }}\n{{ [] | tojson }}{{ {} | tojson(indent=2) }}{{ 'é\"\\n\\u0001' | tojson }}{{ 1.0 | tojson }}{{ none | tojson }}", {"d": {"a": 1, "b": [True, None, 2.5, "x"], "c": {"d": {}}}}),
    ("tojson_indent4", "{{ tools | tojson(indent=4) }}", {"tools": TOOLS}),
    ("string_filters", "{{ '  a b  ' | trim }}|{{ 'xxaxx' | trim('x') }}|{{ 'hello world-foo(bar' | title }}|{{ 'hELLO' | capitalize }}|{{ 'Ab' | upper }}{{ 'Ab' | lower }}|{{ 'aaa' | replace('a', 'b', 2) }}|{{ 'abc' | center(9) }}|{{ 'one two  three' | wordcount }}", {}),
    ("length_count", "{{ 'héllo' | length }} {{ [1, 2] | count }} {{ {'a': 1} | length }} {{ nothing | length }}", {}),
    ("join", "{{ [1, 2, 3] | join(', ') }}|{{ ['a', 'b'] | join }}|{{ users | join(', ', attribute='name') }}", {"users": [{"name": "x"}, {"name": "y"}]}),
    ("default", "{{ nothing | default('d') }} {{ '' | default('e') }} {{ '' | default('f', true) }} {{ none | d('g') }} {{ 0 | default(5, boolean=true) }}", {}),
    ("first_last", "{{ [3, 4] | first }}{{ [3, 4] | last }}{{ 'xyz' | first }}{{ 'xyz' | last }}", {}),
    ("map_select", "{{ users | map(attribute='name') | list }} {{ [1, 2, 3] | map('string') | join('-') }} {{ [0, 1, 2, none] | select | list }} {{ [1, 2, 3, 4] | reject('odd') | list }} {{ [1, 2, 3] | select('gt', 1) | list }}", {"users": [{"name": "x"}, {"name": "y"}]}),
    ("selectattr", "{{ msgs | selectattr('role', 'equalto', 'user') | map(attribute='content') | list }} {{ msgs | rejectattr('role', 'eq', 'user') | list | length }} {{ msgs | selectattr('tool') | list | length }}", {"msgs": [{"role": "user", "content": "a"}, {"role": "system", "content": "b", "tool": 1}, {"role": "user", "content": "c"}]}),
    ("unique_list_string", "{{ [1, 2, 1, 'A', 'a'] | unique | list }} {{ 'ab' | list }} {{ 12 | string ~ 'x' }}", {}),
    ("numbers", "{{ '42' | int }} {{ '4.7' | int }} {{ 'x' | int }} {{ 'x' | int(7) }} {{ 3.9 | int }} {{ 3 | float }} {{ '2.5' | float }} {{ -3 | abs }} {{ 2.5 | round }} {{ 3.5 | round }} {{ 2.567 | round(2) }} {{ 2.1 | round(0, 'ceil') }} {{ 2.9 | round(method='floor') }}", {}),
    ("indent", "{{ 'a\\nb\\n\\nc' | indent(2) }}|{{ 'a\\nb' | indent(2, true) }}|{{ 'a\\n\\nb' | indent(width=1, blank=true) }}|{{ 'x\\ny' | indent('> ') }}", {}),
    ("items_dictsort", "{{ d | items | list }} {{ d | dictsort }} {{ d | dictsort(reverse=true) }} {{ d | dictsort(by='value') }}", {"d": {"b": 1, "a": 3, "C": 2}}),
    ("sort_reverse", "{{ [3, 1, 2] | sort }} {{ ['b', 'A', 'c'] | sort }} {{ ['b', 'A', 'c'] | sort(case_sensitive=true) }} {{ [3, 1, 2] | sort(reverse=true) }} {{ users | sort(attribute='age') | map(attribute='n') | join }} {{ [1, 2] | reverse | list }} {{ 'abc' | reverse }}", {"users": [{"n": "a", "age": 3}, {"n": "b", "age": 1}]}),
    ("sum_min_max", "{{ [1, 2, 3] | sum }} {{ [1, 2] | sum(start=10) }} {{ users | sum(attribute='age') }} {{ [3, 1, 2] | min }} {{ [3, 1, 2] | max }} {{ ['b', 'A'] | min }}", {"users": [{"age": 3}, {"age": 1}]}),
    ("batch", "{{ [1, 2, 3, 4, 5] | batch(2) | list }} {{ [1, 2, 3] | batch(2, 'x') | list }}", {}),
    ("safe_escape", "{{ '<a>' | safe }} {{ '<a & \"b\">' | e }} {{ '<x>' | escape }} {{ 'a' | safe + '<b>' }} {{ '<c>' + 'd' | safe }}", {}),
    ("truncate_striptags", "{{ 'hello world foo bar' | truncate(9) }}|{{ 'hello world' | truncate(5, true) }}|{{ '<p>a  <b>b</b></p>' | striptags }}", {}),
    ("format", "{{ '%s-%d' | format('a', 3) }} {{ '%s and %s' % ('x', 'y') }} {{ '%05.1f' % 3.14159 }}", {}),
    # tests
    ("tests", "{{ x is defined }}{{ y is undefined }}{{ none is none }}{{ 's' is string }}{{ 1 is number }}{{ 1.0 is number }}{{ 1 is integer }}{{ 1.0 is float }}{{ true is boolean }}{{ {} is mapping }}{{ [] is sequence }}{{ 's' is iterable }}{{ 1 is iterable }}", {"x": 1}),
    ("tests2", "{{ true is true }}{{ 0 is false }}{{ 3 is odd }}{{ 4 is even }}{{ 9 is divisibleby 3 }}{{ 1 is eq 1 }}{{ 1 is equalto 2 }}{{ 2 is ne 1 }}{{ 1 is lt 2 }}{{ 2 is ge 2 }}{{ 1 is in [1] }}{{ 'ab' is lower }}{{ 'AB' is upper }}{{ none is sameas none }}{{ x is not none }}", {"x": 0}),
    ("test_callable", "{{ range is callable }}{{ 'x'.upper is callable }}{{ 1 is callable }}", {}),
    # methods
    ("str_methods", "{{ 'abc'.startswith('a') }}{{ 'abc'.endswith(('x', 'c')) }}|{{ '  x  '.strip() }}|{{ 'xxyxx'.lstrip('x') }}|{{ 'xxyxx'.rstrip('x') }}|{{ 'a,b,,c'.split(',') }}{{ ' a  b '.split() }}{{ 'a,b,c'.split(',', 1) }}{{ 'a,b,c'.rsplit(',', 1) }}|{{ 'hello world'.title() }}{{ 'hELLO'.capitalize() }}{{ 'aXa'.replace('a', 'b') }}{{ 'abcb'.find('b') }}{{ 'abcb'.rfind('b') }}{{ 'abcb'.find('z') }}{{ 'abcb'.count('b') }}{{ 'abc'.index('c') }}", {}),
    ("str_methods2", "{{ '{} {}'.format(1, 'b') }}|{{ '{name}!'.format(name='x') }}|{{ '-'.join(['a', 'b']) }}|{{ 'a\\nb\\r\\nc'.splitlines() }}|{{ '12'.isdigit() }}{{ 'ab'.isalpha() }}{{ ' '.isspace() }}{{ 'Ab'.islower() }}{{ 'AB'.isupper() }}|{{ 'Hello'.upper() }}{{ 'Hello'.lower() }}", {}),
    ("list_dict_methods", "{{ [1, 2, 1].count(1) }}{{ [1, 2].index(2) }}|{{ d.get('a') }}{{ d.get('z') }}{{ d.get('z', 0) }}|{{ d.keys() | list }}{{ d.values() | list }}{{ d.items() | list }}", {"d": {"a": 1, "b": 2}}),
    # globals
    ("globals", "{{ range(3) | list }}{{ range(1, 7, 2) | list }}{{ range(5, 0, -2) | list }}{{ dict(a=1, b=2) }}{{ namespace(x=1).x }}{{ strftime_now('%Y-%m-%d %H:%M') }}|{{ strftime_now('%d %b %Y') }}", {}),
    ("cycler_joiner", "{% set c = cycler('a', 'b') %}{{ c.next() }}{{ c.next() }}{{ c.next() }}{% set j = joiner('|') %}{% for x in [1, 2, 3] %}{{ j() }}{{ x }}{% endfor %}", {}),
    # edge cases found by comparing with jinja2
    ("edge_00", "a\n\t  {% if true %}\n\tb{% endif %}", {}),
    ("edge_01", "a  {# c #}  b\n  {# c2 #}\nc", {}),
    ("edge_02", "{% for x in [1,2] %}\n  {{ x }}\n{% endfor %}\n", {}),
    ("edge_03", "{%- raw -%}  x  {%- endraw -%}  y", {}),
    ("edge_04", "{% for x in [1] %}{{ loop.previtem is defined }}{{ loop.nextitem is defined }}{% endfor %}", {}),
    ("edge_05", "{{ nothing | items | list }}{{ 'ab🦙' | length }}{{ ' a b  c '.split(None, 1) }}{{ ' a b  c '.rsplit(None, 1) }}", {}),
    ("edge_06", "{{ x.y is defined }}{{ (x.y.z is defined) if x.y is defined else 'nd' }}", {"x": {}}),
    ("edge_07", "{{ {'a': 'é\u2028'} | tojson }}{{ 'x' | safe | string }}{{ ('<' | safe) ~ '<' }}", {}),
    ("edge_08", "{% macro m(x) %}{{ caller(x * 2) }}{% endmacro %}{% call(v) m(3) %}[{{ v }}]{% endcall %}", {}),
    ("edge_09", "{{ 'b' > 'a' }}{{ 'k' in {'k': 1} }}{{ 1 in [1.0] }}{{ [1, [2]] == [1, [2]] }}{{ none == none }}{{ x == y }}", {}),
    ("edge_10", "{{ nothing | default }}|{{ none | default('x') }}|{{ false | d('y', true) }}", {}),
    ("edge_11", "{% set x = [1, 2, 3] %}{{ x[1:] }}{{ x[::-2] }}{{ x[-5:] }}{{ 'abc'[5:] }}{{ x[1] }}", {}),
    ("edge_12", "{{ messages[0]['content'] }}{{ messages[-1].role }}{{ messages | length }}", {"messages": [{"role": "u", "content": "c"}, {"role": "a", "content": "d"}]}),
    ("edge_13", "{{ 10 / 4 }}{{ 10 / 5 }}{{ 1e300 * 1e10 }}{{ -0.0 }}{{ 1/3*3 }}{{ 100000000000000000.0 }}{{ 0.0001 }}{{ 0.00001 }}", {}),
    ("edge_14", "{{ 3 | round(1) }}{{ 3.14159 | round(3) }}{{ 1 | float | string }}{{ '1e3' | float }}{{ ' 12 ' | int }}{{ '0x1A' | int }}{{ '1_000' | int }}", {}),
    ("edge_15", "{% for k, v in {'a': 1}.items() %}{{ k }}{{ v }}{% endfor %}{% for a in [[1, 2]] %}{{ a }}{% endfor %}", {}),
    ("edge_16", "{% if x is mapping %}m{% endif %}{% if x is iterable %}i{% endif %}{% if x is sequence %}s{% endif %}{% if 'x' is sequence %}S{% endif %}", {"x": {"a": 1}}),
    ("edge_17", "{{ [3, 2, 1] | sort | first }}{{ [{'a': 2}, {'a': 1}] | sort(attribute='a') | first }}{{ ['b', 'a'] | map('upper') | list }}", {}),
    ("edge_18", "{{ 'Hello {0}, {1}!'.format('A', 'B') }}{{ '%-5s|' % 'ab' }}{{ '%.2f' % 2.5 }}{{ '%x' % 255 if false else '' }}", {}),
    ("edge_19", "{{ 'a' * 0 }}{{ [1] * 3 }}{{ 'x' ~ 1.0 }}{{ 1 ~ 2 }}", {}),
    ("edge_20", "{% set ns = namespace(items=[]) %}{% set ns.items = ns.items + [1] %}{{ ns.items }}{{ ns }}", {}),
    ("edge_21", "{{ (1, 2) + (3,) }}{{ ((1, 2) | list) }}{{ {'a': (1, 2)} | tojson }}", {}),
    ("edge_22", "{%- for m in messages -%}\n    {%- if m.role == 'user' -%}\n        U:{{ m.content }}\n    {%- endif -%}\n{%- endfor -%}", {"messages": [{"role": "user", "content": "x"}]}),
    ("edge_23", "  {%- if true %}\n  x\n  {%- endif %}\n  y", {}),
    ("edge_24", "{{ '\\'' }}{{ \"\\\"\" }}{{ '\\x41\\101' }}{{ ['\\''] }}{{ ['\"'] }}{{ ['\\'\"'] }}", {}),
    ("edge_25", "{{ 'abc'.upper().lower() }}{{ 'a-b'.split('-')[1] }}{{ ' x '.strip() ~ '|' }}{{ 'abc'.startswith('') }}{{ 'xyz'.endswith('z', 1) if false else '' }}", {}),
    ("edge_26", "{{ tools | map(attribute='function') | map(attribute='name') | join(',') }}{{ tools[0].function.parameters.properties | list }}", {"tools": TOOLS}),
    ("edge_27", "{{ [1, 2, 3] | select('equalto', 2) | list }}{{ [1, 2, 3] | reject('in', [1, 3]) | list }}{{ ['a', 'B'] | select('lower') | list }}", {}),
    ("edge_28", "{{ 'x' if none }}{{ 'y' if none else none }}{{ [] or 'e' }}{{ 0 and 1 }}", {}),
    ("edge_29", "{% set a = 1 %}{% for i in [1] %}{% set a = 2 %}{% for j in [1] %}{{ a }}{% endfor %}{% endfor %}{{ a }}", {}),
    ("edge_30", "{{ '{}'.format(none) }}{{ '{}'.format([1, 'a']) }}{{ '%s' % none }}{{ '%r' % 'a' }}{{ '%d%%' % 5 }}", {}),
    ("edge_31", "{{ 'Ünïcödé'|upper }}{{ 'ÀB'|lower }}{{ 'ß'|upper }}{{ 'élan vital'|title }}{{ 'éa'.capitalize() }}", {}),
    ("edge_32", "{{ content | trim | replace('\\n', ' ') }}", {"content": "  line1\nline2  \n"}),
    ("edge_33", "{{ -1 | abs }}{{ -1.5 | abs }}{{ 5 // 2.0 }}{{ 5 % 2.5 }}{{ -5 % 3.0 }}{{ 2 ** 0.5 | round(2) }}", {}),
    ("edge_34", "{% for i in range(3) %}{{ loop.cycle('a', 'b') }}{{ loop.revindex }}{% if not loop.last %},{% endif %}{% endfor %}", {}),
    ("edge2_00", "{% if true %}  \n  x{% endif %}", {}),
    ("edge2_01", "a {%- if true %} b {% endif -%} c", {}),
    ("edge2_02", "  {{- 'x' }}\n  {%- if true %}\ny{% endif %}", {}),
    ("edge2_03", "x\n  {% set a = 1 %}  \ny", {}),
    ("edge2_04", "x\n  {% set a = 1 %}\n  {{ a }}\n", {}),
    ("edge2_05", "{% for i in [1,2] -%}\n  {{ i }}\n{%- endfor %}", {}),
    ("edge2_06", "{%- macro f() -%}\n  body\n{%- endmacro -%}\n[{{ f() }}]", {}),
    ("edge2_07", "{# a #}\n{# b #}\nc", {}),
    ("edge2_08", "  {#- a -#}  b", {}),
    ("edge2_09", "{{ '{{' }}{{ '}}' }}{{ '{%' }}", {}),
    ("edge2_10", "{{ {'a': {'b': 1}} }}", {}),
    ("edge2_11", "{{ x }}", {"x": [1.5, {"k": None}]}),
    ("edge2_12", "{{ x | tojson }}", {"x": {"unicode": "\u00e9🦙", "ctrl": "\u0007\u001f", "slash": "/", "big": 12345678901234, "f": 1e-7, "neg": -0.5}}),
    ("edge2_13", "{{ x | string | length }}", {"x": [1, 2]}),
    ("edge2_14", "{{ x.content if x.content is string else x.content | map(attribute='text') | join }}", {"x": {"content": [{"text": "a"}, {"text": "b"}]}}),
    ("edge2_15", "{{ 'a' ~ undefined_var ~ 'b' }}{{ undefined_var | default('') ~ 'c' }}", {}),
    ("edge2_16", "{% if undefined_var %}y{% else %}n{% endif %}{% if undefined_var is not defined %}nd{% endif %}{% for x in undefined_var %}{% endfor %}", {}),
    ("edge2_17", "{{ undefined_var is none }}{{ undefined_var == none }}{{ undefined_var | length }}{{ undefined_var | list }}", {}),
    ("edge2_18", "{{ d.k }}{{ d['k'] }}{{ d.get('k', 'z') }}", {"d": {"k": None}}),
    ("edge2_19", "{{ l | length }}{{ l[0] }}{{ l[-1] }}{{ l | first }}", {"l": ["é", "b"]}),
    ("edge2_20", "{% set x = 5 %}{% macro m() %}{% set x = 6 %}{{ x }}{% endmacro %}{{ m() }}{{ x }}", {}),
    ("edge2_21", "{% for m in msgs %}{% set role = m.role %}{% endfor %}[{{ role }}]", {"msgs": [{"role": "a"}]}),
    ("edge2_22", "{%- set sys = messages[0].content if messages[0].role == 'system' else '' -%}{{ sys }}|{{ messages[1:] | length }}", {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]}),
    ("edge2_23", "{{ messages | selectattr('role', 'equalto', 'user') | list | last }}", {"messages": [{"role": "user", "content": "U"}, {"role": "user", "content": "V"}]}),
    ("edge2_24", "{{ (messages | last).content }}{{ messages[-1]['content'] | trim }}", {"messages": [{"role": "user", "content": " U "}]}),
    ("edge2_25", "{{ 1 if true else 2 if true else 3 }}{{ [1, 2] | join(',') if true }}", {}),
    ("edge2_26", "{{ not true == false }}{{ not 'a' in 'b' }}{{ - 3 ** 2 }}{{ 2 * 3 ** 2 }}{{ 10 - 2 - 3 }}{{ 2 ** 3 ** 2 }}", {}),
    ("edge2_27", "{{ 'a' 'b' ~ 'c' }}{{ ('a', 'b') | join }}{{ [('a', 1)] | map('first') | list }}", {}),
    ("edge2_28", "{% set t = ('a',) %}{{ t }}{{ t | length }}{{ t[0] }}{% set e = () %}{{ e }}", {}),
    ("edge2_29", "{{ range(0) | list }}{{ range(3) | join(',') }}{{ range(10)[2:5] | list }}{{ 3 in range(5) }}", {}),
    ("edge2_30", "{{ [1, 'a'] | map('string') | map('upper') | join }}{{ ['x'] | map('replace', 'x', 'y') | list }}", {}),
    ("edge2_31", "{{ 'abc' | batch(2) | list }}{{ [1,2,3] | slice(2) | list if false else '' }}", {}),
    ("edge2_32", "{{ x | indent(4, first=true) }}", {"x": "a\nb"}),
    ("edge2_33", "{{ x | tojson(indent=2) | indent(2) }}", {"x": {"a": [1, 2]}}),
    ("edge2_34", "{% filter indent(2) %}a\nb{% endfilter %}", {}),
    ("edge2_35", "{{ 'x' | center(4) }}|{{ 'xy' | center(5) }}|{{ 'x'.ljust(3) }}|{{ 'x'.rjust(3, '-') }}|{{ '5'.zfill(3) }}", {}),
    ("edge2_36", "{{ '\\t a \\n'.strip() }}|{{ 'aXbXc'.split('X', -1) }}|{{ 'a'.split('a') }}|{{ ''.split() }}|{{ ''.split(',') }}", {}),
    ("edge2_37", "{{ [none, 1] | select('none') | list }}{{ [1, none] | reject('none') | list }}{{ [{'a': none}, {'a': 1}] | selectattr('a', 'none') | list }}", {}),
    ("edge2_38", "{% set ns = namespace() %}{% set ns.a = 1 %}{{ ns.a }}{{ ns.b is defined }}", {}),
    ("edge2_39", "{{ loop }}", {}),
    ("edge2_40", "{% for a in [1] %}{% for b in [2] %}{{ loop.length }}{% endfor %}{{ loop.index }}{% endfor %}", {}),
    ("edge2_41", "{{ 'x' is string and 'y' is not number }}{{ 1 is not string }}{{ none is not none }}", {}),
    ("edge2_42", "{{ true + 1 }}{{ true * 2.5 }}{{ 1 == true }}{{ 0 == false }}{{ '' == false }}", {}),
    ("edge2_43", "{{ d | dictsort | first }}{{ d.items() | first }}{{ d | list }}{{ d.keys() | list | length }}", {"d": {"z": 1, "a": 2}}),
    ("edge2_44", "{{ (1, 2) == [1, 2] }}{{ [1, 2] < [1, 3] }}{{ 'abc' < 'abd' }}{{ 'B' < 'a' }}", {}),
    ("loop_changed", "{% for m in msgs %}{% if loop.changed(m.role) %}[{{ m.role }}]{% endif %}{{ m.c }}{% endfor %}", {"msgs": [{"role": "u", "c": 1}, {"role": "u", "c": 2}, {"role": "a", "c": 3}, {"role": "u", "c": 4}]}),
    # errors
    ("raise", "{% if true %}{{ raise_exception('Bad role: ' ~ 'x') }}{% endif %}", {}),
    ("err_undefined_attr", "{{ x.y }}", {}),
    ("err_undefined_attr2", "{{ d.a.b }}", {"d": {}}),
    ("err_add_types", "{{ 1 + 'a' }}", {}),
    ("err_concat_dict", "{{ 'a' + {} }}", {}),
    ("err_compare", "{{ 'a' < 1 }}", {}),
    ("err_append_unsafe", "{% set l = [] %}{{ l.append(1) }}", {}),
    ("err_generator_json", "{{ [1] | map('string') | tojson }}", {}),
    ("err_undefined_json", "{{ nothing | tojson }}", {}),
    ("err_range_big", "{{ range(200000) | length }}", {}),
    ("err_len_global", "{{ len([1]) }}", {}),
    ("err_div_zero", "{{ 1 // 0 }}", {}),
    ("err_unpack", "{% for a, b in [[1, 2, 3]] %}{% endfor %}", {}),
    ("err_not_iterable", "{% for x in 5 %}{% endfor %}", {}),
]

CONTEXTS = {
    "user": {"messages": [{"role": "user", "content": "Hello! How are you?"}]},
    "system_user": {"messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Name three colors."}]},
    "multi_turn": {"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"},
                                {"role": "user", "content": "Grüße 🦙 \"q\" & <t>\nline"}]},
    "tools": {"messages": [{"role": "user", "content": "Weather in Paris?"},
                           {"role": "assistant", "content": "", "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
                           {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "{\"temp\": 21}"}],
              "tools": TOOLS},
    "content_parts": {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "text", "text": "there"}]}]},
    "tool_call_string_args": {"messages": [{"role": "user", "content": "U"},
                                           {"role": "assistant", "content": None, "tool_calls": [{"id": "abcdefghi", "type": "function", "function": {"name": "f", "arguments": "{\"a\": 1}"}}]},
                                           {"role": "tool", "tool_call_id": "abcdefghi", "content": "ok"}, {"role": "assistant", "content": "done"}],
                              "tools": TOOLS},
    "thinking": {"messages": [{"role": "user", "content": "U"}, {"role": "assistant", "content": "<think>r</think>A", "reasoning_content": "r"},
                              {"role": "user", "content": "U2"}], "enable_thinking": False},
}


def render(env, src, ctx):
    try:
        return {"rendered": env.from_string(src).render(**ctx)}
    except Exception as e:  # the golden is the error message
        return {"error": str(e)}


def main():
    env = make_env()
    out = []
    for name, src, ctx in INLINE:
        out.append({"source": src, "case": name, "context": ctx, **render(env, src, ctx)})
    for fn in sorted(os.listdir(DIR)):
        if not fn.endswith(".jinja"):
            continue
        src = open(os.path.join(DIR, fn), encoding="utf-8").read()
        for cname, base in CONTEXTS.items():
            for agp in (True, False):
                ctx = dict(base, add_generation_prompt=agp, bos_token="<s>", eos_token="</s>")
                out.append({"template": fn[:-6], "case": cname, "context": ctx, **render(env, src, ctx)})
    with open(os.path.join(DIR, "goldens.json"), "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(f"{len(out)} cases -> {os.path.join(DIR, 'goldens.json')}", file=sys.stderr)


if __name__ == "__main__":
    main()
