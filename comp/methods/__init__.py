"""Methods by name: the registry and the interface they implement, baselines, the hybrid, the U-Net, the composition that turns maps into regions and the learned region merger."""
