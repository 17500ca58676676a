"""The waypoint manager: Gateway API objects in, waypoint Deployments/Services/HPAs/PDBs and status out."""
