"""What a person reads: the figures, the self-contained HTML report and the status
tables. Reads the store and the stored fits.
"""
