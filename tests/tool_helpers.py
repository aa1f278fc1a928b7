"""Tool-call fixtures: Qwen2.5's official chat template (with its tool branches) and a small shop's tools."""

from __future__ import annotations

import json

QWEN25_TOOLS_TEMPLATE = (
    "{%- if tools %}\n"
    "    {{- '<|im_start|>system\\n' }}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n"
    "    {%- else %}\n"
    "        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n"
    "    {%- endif %}\n"
    '    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are '
    'provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}\n'
    "    {%- for tool in tools %}\n"
    '        {{- "\\n" }}\n'
    "        {{- tool | tojson }}\n"
    "    {%- endfor %}\n"
    '    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments '
    'within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": '
    '<args-json-object>}\\n</tool_call><|im_end|>\\n" }}\n'
    "{%- else %}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "    {%- else %}\n"
    "        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
    "assistant.<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    '    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or '
    '(message.role == "assistant" and not message.tool_calls) %}\n'
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    '    {%- elif message.role == "assistant" %}\n'
    "        {{- '<|im_start|>' + message.role }}\n"
    "        {%- if message.content %}\n"
    "            {{- '\\n' + message.content }}\n"
    "        {%- endif %}\n"
    "        {%- for tool_call in message.tool_calls %}\n"
    "            {%- if tool_call.function is defined %}\n"
    "                {%- set tool_call = tool_call.function %}\n"
    "            {%- endif %}\n"
    '            {{- \'\\n<tool_call>\\n{"name": "\' }}\n'
    "            {{- tool_call.name }}\n"
    '            {{- \'", "arguments": \' }}\n'
    "            {{- tool_call.arguments | tojson }}\n"
    "            {{- '}\\n</tool_call>' }}\n"
    "        {%- endfor %}\n"
    "        {{- '<|im_end|>\\n' }}\n"
    '    {%- elif message.role == "tool" %}\n'
    '        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}\n'
    "            {{- '<|im_start|>user' }}\n"
    "        {%- endif %}\n"
    "        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- message.content }}\n"
    "        {{- '\\n</tool_response>' }}\n"
    '        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}\n'
    "            {{- '<|im_end|>\\n' }}\n"
    "        {%- endif %}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)

LOOKUP_ORDER = {
    "type": "function",
    "function": {
        "name": "lookup_order",
        "description": "Look up an order's status by its id.",
        "parameters": {
            "type": "object",
            "properties": {"order_id": {"type": "string", "description": "The order id, e.g. A1001."}},
            "required": ["order_id"],
        },
    },
}
RETURN_POLICY = {
    "type": "function",
    "function": {
        "name": "return_policy",
        "description": "The return policy of a product category.",
        "parameters": {
            "type": "object",
            "properties": {"category": {"type": "string", "enum": ["clothing", "shoes", "electronics"]}},
            "required": ["category"],
        },
    },
}
TOOLS = [LOOKUP_ORDER, RETURN_POLICY]


def openai_row(i: int, order: str = "A1001") -> dict:
    """An OpenAI-layout tool conversation: ask, call, result, answer."""
    return {
        "id": f"tool-{i}",
        "tools": TOOLS,
        "messages": [
            {"role": "user", "content": f"Where is my order {order}? (question {i})"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "lookup_order", "arguments": json.dumps({"order_id": order})},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": json.dumps({"status": "shipped", "n": i})},
            {"role": "assistant", "content": f"Your order {order} has shipped (answer {i})."},
        ],
    }


def sharegpt_row(i: int) -> dict:
    """ShareGPT / LLaMA-Factory function-call layout: `function_call` and `observation` turns, tools as JSON text."""
    return {
        "conversations": [
            {"from": "human", "value": f"What is the return policy for shoes? (question {i})"},
            {
                "from": "function_call",
                "value": json.dumps({"name": "return_policy", "arguments": {"category": "shoes"}}),
            },
            {"from": "observation", "value": json.dumps({"days": 30, "n": i})},
            {"from": "gpt", "value": f"Shoes can be returned within 30 days (answer {i})."},
        ],
        "tools": json.dumps([t["function"] for t in TOOLS]),
    }


# Mistral's v3 tool format (Mistral-7B-Instruct-v0.3's chat template, which mistral-common's v3 tokenizer matches):
# the tools as `[AVAILABLE_TOOLS] [...][/AVAILABLE_TOOLS]` before the last user turn, an assistant's calls as
# `[TOOL_CALLS] [{"name", "arguments", "id"}]</s>` (ids must be 9 letters/digits), results as
# `[TOOL_RESULTS] {"content": ..., "call_id": ...}[/TOOL_RESULTS]`, no generation prompt.
MISTRAL_V3_TOOLS_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- set system_message = messages[0]['content'] %}\n"
    "    {%- set loop_messages = messages[1:] %}\n"
    "{%- else %}\n"
    "    {%- set loop_messages = messages %}\n"
    "{%- endif %}\n"
    "{%- if not tools is defined %}\n"
    "    {%- set tools = none %}\n"
    "{%- endif %}\n"
    "{%- set user_messages = loop_messages | selectattr('role', 'equalto', 'user') | list %}\n"
    "{{- bos_token }}\n"
    "{%- for message in loop_messages %}\n"
    "    {%- if message['role'] == 'user' %}\n"
    "        {%- if tools is not none and (message == user_messages[-1]) %}\n"
    "            {{- '[AVAILABLE_TOOLS] [' }}\n"
    "            {%- for tool in tools %}\n"
    "                {{- tool | tojson }}\n"
    "                {%- if not loop.last %}{{- ', ' }}{%- endif %}\n"
    "            {%- endfor %}\n"
    "            {{- '][/AVAILABLE_TOOLS]' }}\n"
    "        {%- endif %}\n"
    "        {%- if loop.last and system_message is defined %}\n"
    "            {{- '[INST] ' + system_message + '\\n\\n' + message['content'] + '[/INST]' }}\n"
    "        {%- else %}\n"
    "            {{- '[INST] ' + message['content'] + '[/INST]' }}\n"
    "        {%- endif %}\n"
    "    {%- elif message.tool_calls is defined and message.tool_calls %}\n"
    "        {{- '[TOOL_CALLS] [' }}\n"
    "        {%- for tool_call in message.tool_calls %}\n"
    "            {%- set out = tool_call.function | tojson %}\n"
    "            {{- out[:-1] }}\n"
    "            {%- if not tool_call.id is defined or tool_call.id | length != 9 %}\n"
    "                {{- raise_exception('Tool call IDs should be alphanumeric strings with length 9!') }}\n"
    "            {%- endif %}\n"
    "            {{- ', \"id\": \"' + tool_call.id + '\"}' }}\n"
    "            {%- if not loop.last %}{{- ', ' }}{%- else %}{{- ']' + eos_token }}{%- endif %}\n"
    "        {%- endfor %}\n"
    "    {%- elif message['role'] == 'assistant' %}\n"
    "        {{- ' ' + message['content'] | trim + eos_token }}\n"
    "    {%- elif message['role'] == 'tool' %}\n"
    "        {%- if not message.tool_call_id is defined or message.tool_call_id | length != 9 %}\n"
    "            {{- raise_exception('Tool call IDs should be alphanumeric strings with length 9!') }}\n"
    "        {%- endif %}\n"
    '        {{- \'[TOOL_RESULTS] {"content": \' + message.content | string + \', "call_id": "\' + message.tool_call_id'
    " + '\"}[/TOOL_RESULTS]' }}\n"
    "    {%- else %}\n"
    "        {{- raise_exception('Only user, assistant and tool roles are supported after the system message') }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
)
MISTRAL_MARKERS = ["[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_CALLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]"]


def mistral_tools_model(family_dir, out_dir):
    """The tiny Mistral model of the family matrix with Mistral's v3 tool template and its tool tokens as special
    tokens (as in Mistral-7B-Instruct-v0.3's vocabulary; the embeddings grow to hold them), saved to `out_dir`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(family_dir)
    tok.add_tokens(MISTRAL_MARKERS, special_tokens=True)
    tok.chat_template = MISTRAL_V3_TOOLS_TEMPLATE
    model = AutoModelForCausalLM.from_pretrained(family_dir)
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    return out_dir
