"""What every process of the server must agree on: wire format, messages, sockets, config, logs, errors."""
