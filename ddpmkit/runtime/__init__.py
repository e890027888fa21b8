"""What a process needs to run, below both training and generation: devices and precision
(`devices`), process groups and the reference's spawned launch (`distributed`), stop signals
and exit codes (`stops`), logging setup (`logs`)."""
