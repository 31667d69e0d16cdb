"""Developer tooling: the `outrider` command line, the embedded broker launcher, the
simulated OpenAI-compatible provider and tool server, and the `outrider dev` stack."""
