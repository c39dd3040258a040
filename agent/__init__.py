"""mqtt-affinity: sticky MQTT sessions across a broker cluster, decided by an HAProxy SPOE agent."""

__version__ = "0.1.0"
