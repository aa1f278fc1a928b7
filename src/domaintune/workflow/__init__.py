"""The whole loop in one command: data -> train -> eval -> export -> register."""
