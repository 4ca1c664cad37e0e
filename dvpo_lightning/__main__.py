from dvpo_lightning.cli import main

main()
