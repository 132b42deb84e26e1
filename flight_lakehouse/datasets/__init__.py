"""The datasets: one registry (``registry.Datasets``) over the table formats (``base.TableFormat``):
Iceberg tables of Parquet files (``iceberg``) and Lance tables for vectors (``lance``)."""
