// Command ollama_render renders an Ollama Modelfile TEMPLATE on a conversation the way Ollama does.
//
// Usage: ollama_render TEMPLATE_FILE < request.json, where request.json is
// {"system": "<the Modelfile's SYSTEM, may be empty>", "messages": [{"role": ..., "content": ...}, ...]}.
// The rendered prompt goes to stdout.
//
// The semantics are copied from ollama/ollama (stdlib only, no network):
//   - server/prompt.go + server/routes.go: the Modelfile's SYSTEM is prepended as a system message
//     when the conversation does not start with one;
//   - template/template.go, collate: consecutive messages of one role are merged with "\n\n", and the
//     system messages are BOTH kept in .Messages and joined with "\n\n" into .System;
//   - template/template.go, Execute: a template that names .Messages is executed once with
//     {System, Messages, Tools, Response: ""}, option missingkey=zero and a `json` function.
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"text/template"
)

type message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

type request struct {
	System   string    `json:"system"`
	Messages []message `json:"messages"`
}

// collate is ollama's template.collate (image tags left out: text only).
func collate(msgs []message) (string, []*message) {
	var system []string
	var collated []*message
	for i := range msgs {
		msg := msgs[i]
		if msg.Role == "system" {
			system = append(system, msg.Content)
		}
		if len(collated) > 0 && collated[len(collated)-1].Role == msg.Role {
			collated[len(collated)-1].Content += "\n\n" + msg.Content
		} else {
			collated = append(collated, &msg)
		}
	}
	return strings.Join(system, "\n\n"), collated
}

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: ollama_render TEMPLATE_FILE < request.json")
		os.Exit(2)
	}
	raw, err := os.ReadFile(os.Args[1])
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	var req request
	if err := json.NewDecoder(os.Stdin).Decode(&req); err != nil {
		fmt.Fprintln(os.Stderr, "request:", err)
		os.Exit(2)
	}
	msgs := req.Messages
	if req.System != "" && (len(msgs) == 0 || msgs[0].Role != "system") {
		msgs = append([]message{{Role: "system", Content: req.System}}, msgs...)
	}
	funcs := template.FuncMap{"json": func(v any) string { b, _ := json.Marshal(v); return string(b) }}
	tmpl, err := template.New("").Option("missingkey=zero").Funcs(funcs).Parse(string(raw))
	if err != nil {
		fmt.Fprintln(os.Stderr, "template:", err)
		os.Exit(1)
	}
	system, collated := collate(msgs)
	values := map[string]any{"System": system, "Messages": collated, "Tools": nil, "Response": ""}
	if err := tmpl.Execute(os.Stdout, values); err != nil {
		fmt.Fprintln(os.Stderr, "execute:", err)
		os.Exit(1)
	}
}
