"""langchain-openai's ChatOpenAI against zse serve."""
from langchain_core.messages import HumanMessage, SystemMessage
from langchain_openai import ChatOpenAI

from conftest import MODEL_ID


def make(server, **kw):
    return ChatOpenAI(model=MODEL_ID, base_url=server.base + "/v1", api_key="unused", temperature=0, max_tokens=16,
                      max_retries=0, timeout=120, **kw)


def test_invoke_matches_sdk(server, client):
    msg = make(server).invoke([SystemMessage("You write Python."), HumanMessage("Write a function.")])
    sdk = client.chat.completions.create(model=MODEL_ID, temperature=0, max_tokens=16,
                                         messages=[{"role": "system", "content": "You write Python."},
                                                   {"role": "user", "content": "Write a function."}])
    assert msg.content == sdk.choices[0].message.content
    assert msg.response_metadata["finish_reason"] in ("stop", "length")
    assert msg.usage_metadata["output_tokens"] == sdk.usage.completion_tokens


def test_stream(server):
    llm = make(server)
    whole = llm.invoke("def main():").content
    parts = [chunk.content for chunk in llm.stream("def main():")]
    assert "".join(parts) == whole
    assert len(parts) > 2


def test_batch(server):
    llm = make(server)
    outs = llm.batch(["import os", "import sys", "class A:"])
    assert len(outs) == 3 and all(isinstance(o.content, str) for o in outs)
