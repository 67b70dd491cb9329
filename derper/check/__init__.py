"""``derper check``: is my relay working? Pure verdicts (results, derpmap_rules, yaml_subset,
local hints) and the trio probes that gather what they judge (probe)."""
