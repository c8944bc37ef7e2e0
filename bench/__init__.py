"""The throughput benchmark (`make bench`) and its workload generator."""
