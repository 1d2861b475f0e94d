"""The flow collector users look at: decode, print and store IPFIX records, and replay JSON records as IPFIX."""
