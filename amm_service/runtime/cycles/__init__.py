"""Running the AMM: the cycle loop and what one cycle does, from polling to sending directives."""
