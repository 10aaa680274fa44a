"""The one exception type for bad user input: configs, data files, model files."""


class ConfigError(ValueError):
    """Raised before any long work starts; the message names the bad value and what is allowed."""


def choice_error(what: str, value, choices) -> ConfigError:
    valid = ", ".join(repr(c) for c in sorted(choices, key=str))
    return ConfigError(f"unknown {what} {value!r}; valid choices: {valid}")
