"""e-fax (Phaxio): the adapter, status rules and its signed callback."""
