"""A calculator tool agent, trained with GRPO on a local model: the model may call `calculate`, reads the result
and answers; the reward is an exact match with the expected number.

    python examples/calculator/calculator_agent.py                    # SmolLM2-135M on CPU, a few minutes
    python examples/calculator/calculator_agent.py --dev              # two transcripts, no training

Nothing here knows about rltrain beyond ``@rollout``, ``tool_span`` and ``emit_answer``: the agent is a plain
OpenAI-client program, and the tasks are a list of dicts.
"""

from __future__ import annotations

import argparse
import ast
import json
import operator
import random
import re

from openai import OpenAI

from rltrain import GRPO, PromptTemplate, Resources, Trainer, emit_answer, rollout, tool_span

TOOLS = [{
    "type": "function",
    "function": {
        "name": "calculate",
        "description": "Evaluate an arithmetic expression with + - * / and parentheses.",
        "parameters": {"type": "object", "properties": {"expression": {"type": "string"}},
                       "required": ["expression"]},
    },
}]
PROMPT = PromptTemplate(template="{question} Use the calculate tool, then reply with the number only.")
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def calculate(expression: str) -> float:
    """A safe evaluator: numbers and + - * / only."""
    def value(node: ast.AST) -> float:
        if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](value(node.left), value(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -value(node.operand)
        raise ValueError(f"not arithmetic: {ast.unparse(node)}")
    return value(ast.parse(expression, mode="eval").body)


def first_number(text: str | None) -> str | None:
    match = re.search(r"-?\d+(?:\.\d+)?", text or "")
    return match.group(0) if match else None


@rollout
def calculator_agent(task: dict, resources: Resources) -> float:
    llm = resources.llm
    messages = [{"role": "user", "content": resources.prompts["prompt"].format(question=task["question"])}]
    with OpenAI(base_url=llm.base_url, api_key=llm.api_key) as client:
        reply = client.chat.completions.create(model=llm.model, messages=messages, tools=TOOLS,
                                               temperature=llm.sampling.temperature,
                                               max_tokens=llm.sampling.max_tokens).choices[0].message
        if reply.tool_calls:  # one round of tool calls, then the final answer
            messages.append(reply.model_dump(include={"role", "content", "tool_calls"}))
            for call in reply.tool_calls:
                with tool_span(call.function.name, {"arguments": call.function.arguments}) as span:
                    try:
                        span.result = calculate(json.loads(call.function.arguments)["expression"])
                    except Exception as exc:  # a bad call is the model's mistake: shown to it, not raised
                        span.result = f"error: {exc}"
                messages.append({"role": "tool", "tool_call_id": call.id, "content": str(span.result)})
            reply = client.chat.completions.create(model=llm.model, messages=messages, tools=TOOLS,
                                                   temperature=llm.sampling.temperature,
                                                   max_tokens=llm.sampling.max_tokens).choices[0].message
    answer = first_number(reply.content)
    emit_answer(answer)
    return 1.0 if answer is not None and float(answer) == float(task["answer"]) else 0.0


def make_tasks(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    tasks = []
    for i in range(n):
        a, b = rng.randint(2, 30), rng.randint(2, 30)
        op = rng.choice("+-*")
        tasks.append({"id": f"calc-{seed}-{i}", "question": f"What is {a} {op} {b}?",
                      "answer": calculate(f"{a} {op} {b}")})
    return tasks


def main(argv: list[str] | None = None) -> list:
    parser = argparse.ArgumentParser(description="Train a calculator tool agent with GRPO on a local model.")
    parser.add_argument("--model", default="SmolLM2-135M-Instruct")
    parser.add_argument("--run-dir", default="runs/calculator_grpo")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--dev", action="store_true", help="only print two rollouts' transcripts")
    args = parser.parse_args(argv)
    trainer = Trainer(
        algorithm=GRPO(max_steps=args.steps, tasks_per_step=2, num_generations=4, max_completion_length=96,
                       eval_steps=args.steps, save_steps=args.steps),
        model=args.model, run_dir=args.run_dir, initial_resources={"prompt": PROMPT},
        sampling={"train": {"temperature": 1.0, "max_tokens": 24}, "eval": {"temperature": 0.0, "max_tokens": 24}},
    )
    if args.dev:
        return trainer.dev(calculator_agent, make_tasks(2, seed=1))
    return trainer.fit(calculator_agent, train_dataset=make_tasks(8, seed=0), val_dataset=make_tasks(4, seed=1))


if __name__ == "__main__":
    main()
