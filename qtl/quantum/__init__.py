"""The variational circuit of the DQC head: one definition, one or more simulators."""
