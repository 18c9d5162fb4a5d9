"""Version of the gr2.v1 contract this server speaks (the client has its own copy; a test
checks that both agree)."""

PROTOCOL_VERSION = "1.0"
