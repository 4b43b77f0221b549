"""stackwise_hf"""
